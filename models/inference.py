"""Tile inference on Dask workers: a frozen job per tile, windows streamed from the pivot cube.

Workers never talk to MLflow: the driver resolves the champion and writes its weights
(safetensors) and spec (JSON) to a folder; each worker process loads them once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pivotmap.runtime import peak_rss_mb
from pivotmap.tasks.nomenclature import NODATA_CODE


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs for one tile; small, picklable, deterministic."""

    tile_id: str
    rows: tuple[int, int]  # the tile's row span inside the cube
    cols: tuple[int, int]
    pivot_url: str
    model_dir: str
    out_path: str
    batch_size: int
    window: int  # window edge in pixels: bounds the memory per worker
    device: str = "cpu"
    threads: int = 1

    def __dask_tokenize__(self):
        return (type(self).__name__, self.tile_id, self.model_dir, self.pivot_url, self.out_path)


def save_for_workers(model, spec, folder: Path) -> Path:
    """Write weights + spec where workers can read them (idempotent for the same model)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        folder / "weights.safetensors",
    )
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), sort_keys=True))
    return folder


@lru_cache(maxsize=2)
def load_for_worker(model_dir: str, device: str):
    """The model of `model_dir`, loaded once per worker process; never through pickle."""
    from safetensors.torch import load_file

    from pivotmap.models.network import ModelSpec, build_model

    spec = ModelSpec.from_dict(json.loads(Path(model_dir, "spec.json").read_text()))
    model = build_model(spec)
    model.load_state_dict(load_file(Path(model_dir, "weights.safetensors")))
    return model.to(device).eval(), spec


def run_tile_job(job: TileJob) -> dict:
    """Classify one tile window by window and write classes + confidence (atomic rename)."""
    import torch

    torch.set_num_threads(job.threads)
    started = time.perf_counter()
    model, spec = load_for_worker(job.model_dir, job.device)
    raw = open_raw(job.pivot_url)
    h, w = job.rows[1] - job.rows[0], job.cols[1] - job.cols[0]
    classes = np.full((h, w), NODATA_CODE, dtype=np.uint8)
    confidence = np.full((h, w), NODATA_CODE, dtype=np.uint8)
    read_s = 0.0
    for r in range(0, h, job.window):
        for c in range(0, w, job.window):
            t0 = time.perf_counter()
            window = _read_window(raw, job, r, c, spec.step_days)
            read_s += time.perf_counter() - t0
            k, p = classify(model, spec, window, job.batch_size, job.device)
            classes[r : r + k.shape[0], c : c + k.shape[1]] = k
            confidence[r : r + k.shape[0], c : c + k.shape[1]] = p
    _save(Path(job.out_path), classes, confidence)
    total = time.perf_counter() - started
    return {
        "tile": job.tile_id, "pixels": h * w, "seconds": round(total, 3), "read_s": round(read_s, 3),
        "mapped_fraction": round(float((classes != NODATA_CODE).mean()), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }  # fmt: skip


def open_raw(url: str):
    """The cube without CF decoding: int16 as stored (decoded per window, float32, sampled days)."""
    import xarray as xr

    from pivotmap.tasks import cube

    with cube._quiet():
        return xr.open_zarr(url, consolidated=True, chunks=None, mask_and_scale=False)


def _read_window(raw, job: TileJob, r: int, c: int, step_days: int):
    """One window, only the days the network sees, decoded to float32 (NaN for fill values)."""
    import xarray as xr

    rows = slice(job.rows[0] + r, min(job.rows[0] + r + job.window, job.rows[1]))
    cols = slice(job.cols[0] + c, min(job.cols[0] + c + job.window, job.cols[1]))
    window = raw.isel(y=rows, x=cols, time=slice(0, None, step_days)).load()
    decoded = {}
    for name, var in window.data_vars.items():
        values = var.values.astype(np.float32)
        fill = var.attrs.get("_FillValue")
        if fill is not None:
            values[var.values == fill] = np.nan
        values *= np.float32(var.attrs.get("scale_factor", 1.0))
        values += np.float32(var.attrs.get("add_offset", 0.0))
        decoded[name] = (var.dims, values)
    return xr.Dataset(decoded, coords={"time": window.time, "y": window.y, "x": window.x})


def classify(model, spec, ds, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Class codes and confidence (0–100) of a window already sampled every `spec.step_days`;
    255 where the cube has no data."""
    from pivotmap.models.features import day_of_year, has_data, network_input, raw_series
    from pivotmap.models.training import predict_proba

    h, w = ds.sizes["y"], ds.sizes["x"]
    series = raw_series(ds, spec.channels[:-2])
    ok = has_data(series)
    classes = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    confidence = np.full(h * w, NODATA_CODE, dtype=np.uint8)
    if ok.any():
        x = network_input(series[ok], day_of_year(ds), spec)
        proba = predict_proba(model, x, batch_size, device)
        classes[ok] = np.asarray(spec.classes, dtype=np.uint8)[proba.argmax(1)]
        confidence[ok] = np.rint(proba.max(1) * 100).astype(np.uint8)
    return classes.reshape(h, w), confidence.reshape(h, w)


def _save(path: Path, classes: np.ndarray, confidence: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, classes=classes, confidence=confidence)
    tmp.replace(path)  # a crashed tile never leaves a half file under its final name
