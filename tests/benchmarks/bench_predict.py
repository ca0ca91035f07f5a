"""Benchmark: tile inference throughput including the Zarr read, and where the time goes.

Builds a pivot cube (Zarr v3, pivotmap encoding) of random but plausible values, then times
- pivotmap: `run_tile_job` (windowed read + features + batched inference), one thread;
- baseline: the naive path a notebook would take — `xr.open_zarr` with its default chunks,
  the whole tile into memory, then the same classification — one thread.
The last stdout line is a JSON object; `px_per_s_per_core` is the headline figure.

    .venv/bin/python tests/benchmarks/bench_predict.py [--tile 128] [--tiles 2] [--days 365]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def build_cube(url: str, tile: int, tiles: int, days: int) -> None:
    import datetime as dt

    import xarray as xr

    from pivotmap.tasks import cube
    from pivotmap.tasks.grid import GridSpec
    from pivotmap.tasks.pivot import daily_times, pivot_variables

    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=tile, origin_x=500000, origin_y=5630000
    )
    row = [grid.tile(i, 0) for i in range(tiles)]
    extent = grid.union_geobox(row)
    start = dt.date(2023, 1, 1)
    times = daily_times(start, start + dt.timedelta(days=days - 1))
    variables = pivot_variables(["s2", "s1"])
    cube.create(url, cube.template(extent, times, variables, {}), tile)
    rng = np.random.default_rng(0)
    season = np.sin(np.linspace(0, 2 * np.pi, days))[:, None, None].astype(np.float32)
    for t in row:
        data = {}
        for name in variables:
            base = {"VV": -10.0, "VH": -17.0}.get(name, 0.2)
            noise = rng.normal(0, 0.01, (1, tile, tile)).astype(np.float32)
            if name.startswith("age"):
                values = np.broadcast_to(
                    np.arange(days)[:, None, None] % 5, (days, tile, tile)
                ).astype(np.float32)
            else:
                values = base + 0.1 * season + noise
            data[name] = (("time", "y", "x"), values)
        cube.write_tile(url, xr.Dataset(data), t, extent)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)

    import torch
    import xarray as xr

    from pivotmap.models.inference import TileJob, classify, run_tile_job, save_for_workers
    from pivotmap.models.network import ModelSpec, build_model, count_parameters, flops_per_pixel
    from pivotmap.tasks.cube import PivotReader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from pivotmap.config import TrainConfig

    defaults = TrainConfig()  # the network the chain trains by default
    spec = ModelSpec(
        classes=(1, 2, 3, 4, 5, 6), n_steps=-(-args.days // defaults.step_days),
        step_days=defaults.step_days, hidden=defaults.hidden,
    )  # fmt: skip
    model = build_model(spec).eval()
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "pivot.zarr")
        t0 = time.perf_counter()
        build_cube(url, args.tile, args.tiles, args.days)
        build_s = time.perf_counter() - t0
        model_url = save_for_workers(model, spec, str(Path(tmp) / "model"))
        jobs = [
            TileJob(tile_id=f"t{i}", rows=(0, args.tile), cols=(i * args.tile, (i + 1) * args.tile),
                    pivot_url=url, model_url=model_url, out_url=str(Path(tmp) / f"t{i}.npz"),
                    batch_size=8192, window=64)
            for i in range(args.tiles)
        ]  # fmt: skip
        # A fresh worker process, as on Dask: its peak RSS is the job's, not the cube builder's.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(run_tile_job, jobs[0]).result()  # warm-up: imports, model load
            t0 = time.perf_counter()
            results = list(pool.map(run_tile_job, jobs))
            ours_s = time.perf_counter() - t0
        read_s = sum(r["read_s"] for r in results)
        pixels = sum(r["pixels"] for r in results)

        t0 = time.perf_counter()
        for job in jobs:
            ds = (
                xr.open_zarr(url)
                .isel(x=slice(*job.cols), y=slice(*job.rows))
                .load()
                .astype("float32")
            )
            classify(model, spec, ds.isel(time=slice(0, None, spec.step_days)), 8192, "cpu")
        base_s = time.perf_counter() - t0

        window = PivotReader(url).window(slice(0, 64), slice(0, 64), spec.step_days)
        t0 = time.perf_counter()
        classify(model, spec, window, 8192, "cpu")
        compute_one = time.perf_counter() - t0
    result = {
        "benchmark": "predict",
        "tile_px": args.tile, "tiles": args.tiles, "days": args.days, "cube_build_s": round(build_s, 2),
        "parameters": count_parameters(model), "flops_per_pixel": flops_per_pixel(spec),
        "px_per_s_per_core": round(pixels / ours_s, 1),
        "baseline_px_per_s_per_core": round(pixels / base_s, 1),
        "ratio": round(base_s / ours_s, 3),
        "io_share": round(read_s / ours_s, 3), "compute_share": round(1 - read_s / ours_s, 3),
        "compute_only_px_per_s": round(window.sizes["x"] * window.sizes["y"] / compute_one, 1),
        "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in results),
        "window_px": jobs[0].window,
        "device": "cpu",
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
