"""Tile inference on Dask workers: a frozen job per tile, windows streamed from the pivot cube.

Workers never talk to MLflow: the driver resolves the model (`predict.model_uri`, else the run's
champion), checks it against the cube's settings and writes its weights
(safetensors) and spec (JSON) under the run folder; each worker process loads them once from
that URL, so a worker on another machine needs nothing but the run folder's URL.
Finished tiles (same model version, same cube) are skipped on a re-run.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from pivotmap.progress import track
from pivotmap.results import ModelRef, PivotResult, PredictResult
from pivotmap.runtime import keep_freed_memory, kv, peak_rss_mb, run_logger
from pivotmap.tasks import storage
from pivotmap.tasks.cube import PivotReader, iter_windows
from pivotmap.tasks.nomenclature import NODATA_CODE

if TYPE_CHECKING:
    from pivotmap.config import RunConfig
    from pivotmap.models.calendar import CalendarShift
    from pivotmap.models.registry import LoadedModel
    from pivotmap.tasks.grid import Tile
    from pivotmap.tasks.workspace import Workspace

NOMENCLATURE_FILE = "nomenclature.yaml"  # tasks/publish.py reads it by this name


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs for one tile; small, picklable, deterministic."""

    tile_id: str
    rows: tuple[int, int]  # the tile's row span inside the cube
    cols: tuple[int, int]
    pivot_url: str
    model_url: str
    out_url: str
    batch_size: int
    window: int  # window edge in pixels: bounds the memory per worker
    device: str = "cpu"
    threads: int = 1
    shift_steps: int = 0  # series moved this many steps later (`models.calendar`)

    def __dask_tokenize__(self):
        return (
            type(self).__name__, self.tile_id, self.model_url, self.pivot_url, self.out_url,
            self.shift_steps,
        )  # fmt: skip


def predict(ws: Workspace, device: str | None = None, force: bool = False) -> PredictResult:
    """Resolve the model (`predict.model_uri`, else the run's `models:/<name>@<alias>`), check
    that it learnt from a cube built like this one, and classify every tile not already done."""
    from pivotmap.tasks.cluster import worker_device

    started = time.monotonic()
    config = ws.config
    dev = device or worker_device()
    cube_version = ws.read_result(PivotResult).cube_version
    found = resolve_model(ws)
    info = found.info
    check_cube_settings(ws, found)  # before a pixel is read or a map written
    model_url = save_for_workers(
        found.model, found.spec, ws.model_url(info["name"], info["version"])
    )
    save_nomenclature(ws, info, model_url)
    shift = calendar_shift(ws, found.spec)
    key = f"{info['name']}/{info['version']}@{cube_version}"
    key += f"+shift{shift.days}d" if shift.steps else ""
    tiles = ws.tiles()
    todo = [t for t in tiles if force or not _mapped(ws, t.id, key)]
    results = run_jobs(
        tile_jobs(ws, model_url, dev, todo, shift.steps),
        config.dask.address or config.predict.dask,
        config.predict.workers,
        on_done=lambda result: ws.mark_done("predict", result["tile"], key, result),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    pixels = sum(r["pixels"] for r in results)
    run_logger("predict").info(
        kv("predict", tiles_written=len(todo), tiles_skipped=len(tiles) - len(todo),
           model=info["name"], model_version=info["version"], cache_key=key,
           calendar_shift_days=shift.days)
    )  # fmt: skip
    result = PredictResult(
        model=ModelRef(**info), device=dev, tiles=results,
        tiles_already_done=[t.id for t in tiles if t not in todo], cache_key=key, pixels=pixels,
        px_per_s=round(pixels / elapsed, 1) if pixels else 0.0, duration_s=round(elapsed, 2),
        peak_rss_mb_per_worker=max((r["peak_rss_mb"] for r in results), default=0.0),
        calendar_shift=shift.summary(),
    )  # fmt: skip
    ws.write_result(result)
    return result


def calendar_shift(ws: Workspace, spec) -> CalendarShift:
    """The shift predict applies (`predict.calendar_shift`): none, the configured days, or
    estimated on a sample of this run's cube against the model's season (`models.calendar`).
    An estimate that cannot be made (a model without a season, a cube of another length, too
    few pixels) moves nothing and says why, in the log and the predict result."""
    from pivotmap.models.calendar import (
        CalendarError,
        CalendarShift,
        estimate_shift,
        region_sample,
    )

    cfg = ws.config.predict
    if cfg.calendar_shift != "auto":
        steps = int(round(cfg.calendar_shift / spec.step_days))
        return CalendarShift(steps, spec.step_days, "fixed" if steps else "none", {})
    series = region_sample(ws.pivot_url, spec, cfg.calendar_pixels, ws.config.train.seed)
    try:
        shift = estimate_shift(
            spec.season, series, spec.channels[:-2], spec.step_days, cfg.calendar_search_days
        )
    except CalendarError as err:
        shift = CalendarShift(0, spec.step_days, "auto", {}, len(series), note=str(err))
    run_logger("predict").info(
        kv("calendar", shift_days=shift.days, pixels=shift.pixels,
           distance_at_0=shift.distance.get(0), distance_chosen=shift.distance.get(shift.days))
    )  # fmt: skip
    if shift.note:
        run_logger("predict").warning("calendar: %s", shift.note)
    return shift


def model_uri(config: RunConfig) -> str:
    """The registry URI predict maps with: `predict.model_uri`, else the run's own model."""
    return config.predict.model_uri or f"models:/{config.model_name}@{config.predict.model_alias}"


def resolve_model(ws: Workspace) -> LoadedModel:
    """The network of `model_uri(config)` on the tracking server of `mlflow.tracking_uri` (the
    run folder's own store when unset), with its version tags.

    Raises:
        LookupError: the URI does not resolve; the message names it, the tracking URI (without
            credentials) and what to do.
    """
    from pivotmap.models.registry import load_model, tracking_uri_for

    config = ws.config
    uri = model_uri(config)
    try:
        tracking = tracking_uri_for(ws.root, config.mlflow.tracking_uri)
    except ValueError as err:  # a run folder on object storage and no tracking server set
        raise LookupError(f"{uri}: {err}") from None
    try:
        return load_model(tracking_uri=tracking, model_uri=uri, device="cpu")
    except LookupError as err:
        if config.predict.model_uri:
            raise LookupError(f"predict.model_uri: {err}") from None
        raise


def check_cube_settings(ws: Workspace, found: LoadedModel) -> None:
    """Stop unless the model learnt from a cube gap-filled like this run's (CubeMismatchError
    names each setting and both values); a model registered before the settings were kept
    is used with a warning."""
    from pivotmap.models import cube_settings as cs
    from pivotmap.tasks.cube import open_cube

    name = f"{found.info['name']} v{found.info['version']}"
    trained = cs.from_tags(found.tags)
    if not trained:
        run_logger("predict").warning(
            "model %s records no cube settings (registered before they were kept): not checked "
            "against this cube (%s)", name, ws.pivot_url,
        )  # fmt: skip
        return
    cube = open_cube(ws.pivot_url)
    cs.check_cube(name, trained, cs.pivot_settings(cube.attrs), {str(v) for v in cube.data_vars})


def save_nomenclature(ws: Workspace, info: dict[str, str], model_url: str) -> None:
    """Leave the legend the model was trained with beside its weights (`NOMENCLATURE_FILE`):
    publish reads it when the run config has no labels (a model trained elsewhere)."""
    from pivotmap.models.registry import load_model_files, tracking_uri_for

    files = load_model_files(
        tracking_uri=tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri),
        model_name=info["name"], version=info["version"], names=("nomenclature",),
    )  # fmt: skip
    if "nomenclature" in files:
        storage.write_bytes(storage.join(model_url, NOMENCLATURE_FILE), files["nomenclature"])


def predict_shift_steps(ws: Workspace, ref: ModelRef, spec) -> int:
    """The calendar shift (steps) predict classified this run with, if it used this model;
    else 0 (a model predict did not run cannot have chosen one). Concept maps and
    explanations feed the network the series as predict did."""
    found = ws.find_result(PredictResult)
    if found is None or (found.model.name, found.model.version) != (ref.name, ref.version):
        return 0
    return int(round(found.calendar_shift.get("days", 0) / spec.step_days))


def _mapped(ws: Workspace, tile_id: str, key: str) -> bool:
    """Whether a tile's map is done with this key AND still there (a deleted map is redone)."""
    return ws.is_done("predict", tile_id, key) and storage.exists(ws.map_url(tile_id))


def tile_jobs(
    ws: Workspace, model_url: str, device: str, tiles: list[Tile], shift_steps: int = 0
) -> list[TileJob]:
    """One job per tile, with the tile's span inside the cube (the extent of all tiles)."""
    extent = ws.extent(ws.tiles())
    cfg = ws.config.predict
    jobs = []
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        jobs.append(
            TileJob(
                tile_id=tile.id, rows=(rows.start, rows.stop), cols=(cols.start, cols.stop),
                pivot_url=ws.pivot_url, model_url=model_url, out_url=ws.map_url(tile.id),
                batch_size=cfg.batch_size, window=cfg.window, device=device,
                shift_steps=shift_steps,
            )
        )  # fmt: skip
    return jobs


def run_jobs(
    jobs: list[TileJob], address: str, workers: int | None, on_done: Callable[[dict], None]
) -> list[dict]:
    """Run tile jobs in this process ('none') or on a Dask cluster; results in job order.

    `on_done` gets each result as soon as its tile is written, so a crash loses no finished tile.
    """
    if address == "none" or len(jobs) <= 1:
        results = []
        for job in track(jobs, "predict", total=len(jobs)):
            results.append(run_tile_job(job))
            on_done(results[-1])
        return results
    from distributed import as_completed

    from pivotmap.tasks.cluster import dask_client

    with dask_client(address, workers) as client:
        futures = client.map(run_tile_job, jobs, pure=False)
        done = {}
        for future in track(as_completed(futures), "predict", total=len(futures)):
            result = future.result()
            on_done(result)
            done[result["tile"]] = result
    return [done[job.tile_id] for job in jobs]


def save_for_workers(model, spec, url: str) -> str:
    """Write weights + spec where workers can read them (idempotent for the same model)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(url, "weights.safetensors"), save(state))
    storage.write_text(storage.join(url, "spec.json"), json.dumps(spec.to_dict(), sort_keys=True))
    return url


@lru_cache(maxsize=2)
def load_for_worker(url: str, device: str):
    """The model at `url`, loaded once per worker process; never through pickle."""
    from safetensors.torch import load

    from pivotmap.models.network import ModelSpec, build_model

    spec = ModelSpec.from_dict(json.loads(storage.read_bytes(storage.join(url, "spec.json"))))
    model = build_model(spec)
    model.load_state_dict(load(storage.read_bytes(storage.join(url, "weights.safetensors"))))
    return model.to(device).eval(), spec


def run_tile_job(job: TileJob) -> dict:
    """Classify one tile window by window and write classes + confidence."""
    import torch

    keep_freed_memory()  # window after window re-uses the same memory (see its docstring)
    torch.set_num_threads(job.threads)
    started = time.perf_counter()
    model, spec = load_for_worker(job.model_url, job.device)
    reader = PivotReader(job.pivot_url)
    h, w = job.rows[1] - job.rows[0], job.cols[1] - job.cols[0]
    classes = np.full((h, w), NODATA_CODE, dtype=np.uint8)
    confidence = np.full((h, w), NODATA_CODE, dtype=np.uint8)
    read_s = 0.0
    for rows, cols in iter_windows(job.rows, job.cols, job.window):
        t0 = time.perf_counter()
        window = reader.window(rows, cols, spec.step_days)
        read_s += time.perf_counter() - t0
        at = (
            slice(rows.start - job.rows[0], rows.stop - job.rows[0]),
            slice(cols.start - job.cols[0], cols.stop - job.cols[0]),
        )
        classes[at], confidence[at] = classify(
            model, spec, window, job.batch_size, job.device, job.shift_steps
        )
    save_map(job.out_url, classes, confidence)
    total = time.perf_counter() - started
    return {
        "tile": job.tile_id, "pixels": h * w, "seconds": round(total, 3), "read_s": round(read_s, 3),
        "mapped_fraction": round(float((classes != NODATA_CODE).mean()), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }  # fmt: skip


def classify(
    model, spec, ds, batch_size: int, device: str, shift_steps: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class codes and confidence (0–100: the class's probability, times the members'
    agreement for an ensemble) of a window already sampled every `spec.step_days`, its series
    moved `shift_steps` later (`models.calendar`); 255 where the cube has no data."""
    from pivotmap.models.features import window_inputs
    from pivotmap.models.training import confidence_percent, predict_vote

    h, w = ds.sizes["y"], ds.sizes["x"]
    x, ok = window_inputs(ds, spec, shift_steps)
    classes = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    confidence = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    if ok.any():
        proba, agreement = predict_vote(model, x, batch_size, device)
        classes[ok] = np.asarray(spec.classes, dtype=np.uint8)[proba.argmax(1)]
        confidence[ok] = confidence_percent(proba, agreement)
    return classes.reshape(h, w), confidence.reshape(h, w)


def save_map(url: str, classes: np.ndarray, confidence: np.ndarray) -> None:
    """A tile's classes and confidence as one npz, written whole: a crash never leaves half."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, classes=classes, confidence=confidence)
    storage.write_bytes(url, buffer.getvalue())
