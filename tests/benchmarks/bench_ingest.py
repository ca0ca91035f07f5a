"""Benchmark: COG → obs throughput of pivotmap's ingest against plain odc-stac + to_zarr.

Generates a seeded synthetic region (SYNTHETIC data, `generate_demo_region`) with larger tiles,
then in one process times

* pivotmap: `tasks.ingest.ingest` (static catalogue search, Great Expectations item checks, SCL masking,
  S1 → dB, windowed reads on Dask threads, int16 Zarr v3 obs cubes per tile block), and
* baseline: `odc.stac.load(items, bands, geobox, groupby="solar_day")` of the same items and
  bands (S2 bands + SCL, S1 vv/vh) onto the same geobox, then `to_zarr` (Zarr v3), no masking.

Throughput is pixel-dates per second summed over both modalities (pixels of the region × dates).
The last stdout line is a JSON object with `pivotmap_px_dates_per_s`, `baseline_px_dates_per_s`
and `ratio`. Not collected by pytest. Usage:

    .venv/bin/python tests/benchmarks/bench_ingest.py [--tile-size 256] [--tiles 2] [--months 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pivotmap.results import IngestResult


def _config(data: Path, tile_size: int, tiles: int, months: int, workers: int) -> dict:
    span = tile_size * tiles * 10
    return {
        "name": "bench",
        "source": {"kind": "static", "url": str(data / "catalog.json")},
        "grid": {"crs": "EPSG:32631", "resolution": 10, "tile_size": tile_size,
                 "origin_x": 500000, "origin_y": 5630000},
        "region": {"bbox": [500000, 5630000, 500000 + span, 5630000 + span], "crs": "EPSG:32631"},
        "period": {"start": "2023-04-01", "end": f"2023-{3 + months:02d}-28"},
        "ingest": {"workers": workers},
    }  # fmt: skip


def _baseline(config, out: Path, workers: int) -> tuple[float, int]:
    """Plain odc-stac load + to_zarr of the items pivotmap used; returns (seconds, px-dates)."""
    import odc.stac

    from pivotmap.tasks.region import tiles_lonlat
    from pivotmap.tasks.stac_source import search_items
    from pivotmap.tasks.workspace import Workspace

    ws = Workspace.open(config, out)
    tiles = ws.tiles()
    geobox = ws.extent(tiles)
    period, src = config.period, config.source
    found = {
        c: search_items("static", src.url, c, tiles_lonlat(tiles), period.start, period.end)
        for c in (src.s2_collection, src.s1_collection)
    }
    bands = {
        src.s2_collection: ["blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir",
                            "nir08", "swir16", "swir22", "scl"],
        src.s1_collection: ["vv", "vh"],
    }  # fmt: skip
    started, px_dates = time.perf_counter(), 0
    for collection, items in found.items():
        ds = odc.stac.load(
            items, bands=bands[collection], geobox=geobox, groupby="solar_day",
            chunks=None, pool=workers, resampling={"scl": "nearest", "*": "bilinear"},
        )  # fmt: skip
        ds.to_zarr(out / f"{collection}.zarr", mode="w", zarr_format=3, consolidated=True)
        px_dates += ds.sizes["time"] * ds.sizes["y"] * ds.sizes["x"]
    return time.perf_counter() - started, px_dates


def _pivotmap(config, out: Path) -> tuple[float, int, IngestResult]:
    from pivotmap.tasks.ingest import ingest
    from pivotmap.tasks.workspace import Workspace

    started = time.perf_counter()
    result = ingest(Workspace.open(config, out), force=True)
    seconds = time.perf_counter() - started
    n_px = len(result.tiles) * config.grid.tile_size**2
    px_dates = sum(m.dates * n_px for m in result.modalities.values())
    return seconds, px_dates, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=2, help="tiles per side")
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import pivotmap.tasks.ingest  # noqa: F401  (warm the imports)
    from pivotmap.config import RunConfig
    from pivotmap.runtime import apply_offline_defaults
    from pivotmap.tasks.synthetic import generate_demo_region

    apply_offline_defaults()
    import great_expectations  # noqa: F401  (a one-off import, ~6 s; not ingest work)

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        t0 = time.perf_counter()
        generate_demo_region(work / "data", tiles_x=args.tiles, tiles_y=args.tiles,
                             tile_size=args.tile_size, start="2023-04-01",
                             end=f"2023-{3 + args.months:02d}-28")  # fmt: skip
        print(f"generated data in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        raw = _config(work / "data", args.tile_size, args.tiles, args.months, args.workers)
        (work / "bench.yaml").write_text(yaml.safe_dump(raw))
        config = RunConfig.model_validate(raw)
        ours, base = [], []
        for k in range(args.repeat):
            seconds, px, summary = _pivotmap(config, work / f"pivotmap-{k}")
            ours.append(px / seconds)
            seconds_b, px_b = _baseline(config, work / f"baseline-{k}", args.workers)
            base.append(px_b / seconds_b)
            print(f"run {k}: pivotmap {px} px-dates in {seconds:.2f} s; "
                  f"baseline {px_b} px-dates in {seconds_b:.2f} s", file=sys.stderr)  # fmt: skip
        result = {
            "pivotmap_px_dates_per_s": round(max(ours)),
            "baseline_px_dates_per_s": round(max(base)),
            "ratio": round(max(ours) / max(base), 3),
            "tiles": len(summary.tiles),
            "tile_size": args.tile_size,
            "dates": {m: v.dates for m, v in summary.modalities.items()},
            "workers": args.workers,
            "data": "SYNTHETIC (generate_demo_region)",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
