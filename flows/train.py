"""Train flow: labels on the grid + pivot cube → a fused S1/S2 classifier, measured and registered."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from pivotmap import __version__
from pivotmap.flows.config import RunConfig
from pivotmap.flows.workspace import Workspace
from pivotmap.models.features import (
    day_of_year,
    fit_normalisation,
    network_input,
    raw_series,
    sampled,
)
from pivotmap.models.network import ModelSpec, count_parameters, flops_per_pixel
from pivotmap.models.training import (
    fit,
    metrics,
    pick_device,
    predict_proba,
    spatial_block_split,
    stratified_sample,
)
from pivotmap.tasks import cube
from pivotmap.tasks.labels import UNKNOWN, read_labels
from pivotmap.tasks.nomenclature import load_nomenclature


class TrainingDataError(ValueError):
    """Too few labelled pixels or classes to train and evaluate a model."""


def labelled_series(
    ws: Workspace, labels: np.ndarray, step_days: int, channels
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Series [N, T, C], codes [N] and flat extent indices [N] of every labelled pixel."""
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    pivot = cube.open_cube(ws.pivot_url)
    xs, ys, where = [], [], []
    doy = None
    flat_index = np.arange(labels.size).reshape(labels.shape)
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        tile_labels = labels[rows, cols].ravel()
        keep = tile_labels != UNKNOWN
        if not keep.any():
            continue
        ds = sampled(cube.read_tile(pivot, tile), step_days)
        doy = day_of_year(ds)
        xs.append(raw_series(ds, channels)[keep])
        ys.append(tile_labels[keep])
        where.append(flat_index[rows, cols].ravel()[keep])
    if not xs:
        raise TrainingDataError(
            "no labelled pixel inside the region: check `labels.url` and `region`"
        )
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(where), doy


def validation_key(labels_url: str, test_mask: np.ndarray, cube_version: str) -> str:
    """Names the held-out data: same labels file, same split, same cube."""
    digest = hashlib.sha256(
        Path(labels_url).read_bytes() if Path(labels_url).is_file() else labels_url.encode()
    )
    digest.update(np.packbits(test_mask).tobytes())
    digest.update(cube_version.encode())
    return digest.hexdigest()[:16]


@flow(name="train")
def train_flow(config: RunConfig, out_dir: str, device: str | None = None) -> dict:
    """Split labels spatially, train on the pivot cube, evaluate on held-out blocks, register."""
    from pivotmap.models.registry import log_and_register, tracking_uri_for

    started = time.monotonic()
    logger = get_run_logger()
    ws = Workspace.open(config, out_dir)
    if config.labels is None:
        raise TrainingDataError(
            f"config {config.name!r} has no `labels` section: training needs reference data"
        )
    nomenclature = load_nomenclature(config.labels.nomenclature)
    extent = ws.extent(ws.tiles())
    labels = read_labels(config.labels.url, extent, nomenclature)
    tc = config.train
    test_mask = spatial_block_split(labels, tc.block_size, tc.test_fraction, tc.seed)
    base = ModelSpec(
        classes=tuple(int(c) for c in np.unique(labels[labels != UNKNOWN])),
        step_days=tc.step_days,
        hidden=tc.hidden,
    )
    if len(base.classes) < 2:
        raise TrainingDataError(
            f"labels {config.labels.url} hold fewer than two classes inside the region"
        )
    series, codes, flat, doy = labelled_series(ws, labels, tc.step_days, base.channels[:-2])
    is_test = test_mask.ravel()[flat]
    spec = fit_normalisation(series[~is_test], base)
    spec = ModelSpec(**{**spec.to_dict(), "n_steps": int(series.shape[1])})
    x = network_input(series, doy, spec)
    index = {c: i for i, c in enumerate(spec.classes)}
    y = np.array([index[c] for c in codes], dtype=np.int64)
    dev = pick_device(device)
    train_idx = np.flatnonzero(~is_test)[
        stratified_sample(codes[~is_test], tc.max_train_pixels, tc.seed)
    ]
    fitted = fit(
        x[train_idx],
        y[train_idx],
        spec,
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        device=dev,
    )
    proba = predict_proba(fitted.model, x[is_test], 8192, dev)
    scores = metrics(codes[is_test], np.array(spec.classes)[proba.argmax(1)], spec.classes)
    pivot_report = ws.read_report("pivot")
    key = validation_key(config.labels.url, test_mask, pivot_report["cube_version"])
    registered = log_and_register(
        tracking_uri=tracking_uri_for(ws.root, config.mlflow.tracking_uri),
        artifact_root=ws.mlflow_dir / "artifacts",
        experiment=f"pivotmap-{config.name}",
        model_name=config.model_name,
        model=fitted.model.cpu(),
        spec=spec,
        params={
            **tc.model_dump(),
            "n_train_pixels": len(train_idx),
            "n_test_pixels": int(is_test.sum()),
            "cube_url": ws.pivot_url,
            "cube_version": pivot_report["cube_version"],
            "labels_url": config.labels.url,
            "config_hash": config.config_hash(),
            "software_version": __version__,
            "device": dev,
        },
        metrics={k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
        | {f"f1_{c}": f for c, f in scores["per_class_f1"].items()},
        validation_key=key,
        input_example=x[:4],
    )
    logger.info(
        "model %s v%s: OA %.3f macro-F1 %.3f (%s)",
        registered.name,
        registered.version,
        scores["overall_accuracy"],
        scores["macro_f1"],
        registered.reason,
    )
    summary = {
        "stage": "train",
        **{
            k: scores[k]
            for k in ("overall_accuracy", "macro_f1", "kappa", "per_class_f1", "n_test_pixels")
        },
        "confusion_matrix": scores["confusion_matrix"],
        "classes": list(spec.classes),
        "n_train_pixels": len(train_idx),
        "split": f"spatial blocks of {tc.block_size} px, {tc.test_fraction:.0%} held out",
        "model_name": registered.name,
        "model_version": registered.version,
        "run_id": registered.run_id,
        "model_uri": registered.uri,
        "promoted": registered.promoted,
        "promotion_reason": registered.reason,
        "champion_version": registered.champion_version,
        "validation_key": key,
        "parameters": count_parameters(fitted.model),
        "flops_per_pixel": flops_per_pixel(spec),
        "device": dev,
        "final_loss": round(fitted.losses[-1], 4),
        "duration_s": round(time.monotonic() - started, 2),
    }
    ws.write_report("train", summary)
    return summary
