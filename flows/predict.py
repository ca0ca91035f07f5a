"""Predict flow: the champion model over every tile of the pivot cube → class and confidence."""

from __future__ import annotations

import time

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from pivotmap.flows.config import RunConfig
from pivotmap.flows.progress import track
from pivotmap.flows.workspace import Workspace
from pivotmap.models.features import day_of_year, has_data, network_input, raw_series, sampled
from pivotmap.models.training import pick_device, predict_proba
from pivotmap.tasks import cube
from pivotmap.tasks.grid import Tile
from pivotmap.tasks.nomenclature import NODATA_CODE


def classify_tile(model, spec, ds, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Class codes and confidence (0–100) of one tile; 255 where the cube has no data."""
    h, w = ds.sizes["y"], ds.sizes["x"]
    ds = sampled(ds, spec.step_days)
    series = raw_series(ds, spec.channels[:-2])
    ok = has_data(series)
    classes = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    confidence = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    if ok.any():
        proba = predict_proba(
            model, network_input(series[ok], day_of_year(ds), spec), batch_size, device
        )
        classes[ok] = np.asarray(spec.classes, dtype=np.uint8)[proba.argmax(1)]
        confidence[ok] = np.rint(proba.max(1) * 100).astype(np.uint8)
    return classes.reshape(h, w), confidence.reshape(h, w)


@task(cache_policy=NONE)
def predict_tile(ws: Workspace, tile: Tile, pivot, model, spec, device: str) -> dict:
    ds = cube.read_tile(pivot, tile)
    classes, confidence = classify_tile(model, spec, ds, ws.config.predict.batch_size, device)
    ws.maps_dir.mkdir(parents=True, exist_ok=True)
    path = ws.maps_dir / f"{tile.id}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, classes=classes, confidence=confidence)
    tmp.replace(path)  # a crashed tile never leaves a half file under its final name
    return {"tile": tile.id, "mapped_fraction": round(float((classes != NODATA_CODE).mean()), 4)}


@flow(name="predict")
def predict_flow(config: RunConfig, out_dir: str, device: str | None = None) -> dict:
    """Resolve `models:/<name>@<alias>` and classify every tile."""
    from pivotmap.models.registry import load_champion, tracking_uri_for

    started = time.monotonic()
    logger = get_run_logger()
    ws = Workspace.open(config, out_dir)
    dev = pick_device(device)
    model, spec, info = load_champion(
        tracking_uri=tracking_uri_for(ws.root, config.mlflow.tracking_uri),
        model_name=config.model_name,
        alias=config.predict.model_alias,
        device=dev,
    )
    pivot = cube.open_cube(ws.pivot_url)
    tiles = ws.tiles()
    results = [
        predict_tile(ws, tile, pivot, model, spec, dev)
        for tile in track(tiles, "predict", total=len(tiles))
    ]
    elapsed = time.monotonic() - started
    pixels = len(tiles) * config.grid.tile_size**2
    logger.info("predicted %d tiles with %s v%s", len(tiles), info["name"], info["version"])
    summary = {
        "stage": "predict",
        "model": info,
        "tiles": results,
        "device": dev,
        "pixels": pixels,
        "px_per_s": round(pixels / elapsed, 1),
        "duration_s": round(elapsed, 2),
    }
    ws.write_report("predict", summary)
    return summary
