"""Small generated obs cubes, a pivot build that mirrors the pivot stage, and a one-tile run
folder, for the cube tests."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import xarray as xr

from pivotmap.config import RunConfig
from pivotmap.results import IngestResult, ModalityIngest
from pivotmap.tasks import cube
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.pivot import FillSettings, Tail, daily_times, fill_region, pivot_variables
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES
from pivotmap.tasks.workspace import Workspace

START = dt.date(2024, 3, 1)
SIZE = 32
GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=SIZE, origin_x=5e5, origin_y=5.6e6)
TILE = GRID.tile(0, 0)
EXTENT = GRID.union_geobox([TILE])
SETTINGS = FillSettings("linear", 10, 366, START)


def obs_values(modality: str, n_dates: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible values with ~30 % clouds (S2); the same seed gives the same leading dates."""
    rng = np.random.default_rng(seed)
    names = S2_VARIABLES if modality == "s2" else S1_VARIABLES
    shape = (n_dates, SIZE, SIZE)
    cloud = rng.random(shape) < (0.3 if modality == "s2" else 0.0)
    out = {}
    for i, name in enumerate(names):
        base = 0.05 + 0.02 * i if modality == "s2" else -12.0 - 6 * i
        noise = 0.01 if modality == "s2" else 1.0
        values = (base + rng.normal(0, noise, shape)).astype(np.float32)
        out[name] = np.where(cloud, np.nan, values).astype(np.float32)
    return out


def write_obs(url: str, modality: str, days: np.ndarray, seed: int = 0) -> None:
    """An obs cube with acquisitions on day indices `days` (from START)."""
    times = (np.datetime64(START, "D") + np.asarray(days)).astype("datetime64[ns]")
    values = obs_values(modality, 200, seed)
    names = list(values)
    cube.create(url, cube.template(EXTENT, times, names, {}), SIZE)
    data = {n: (("time", "y", "x"), v[: len(days)]) for n, v in values.items()}
    cube.write_tile(url, xr.Dataset(data), TILE, EXTENT)


def build(
    pivot_url: str,
    obs_urls: dict[str, str],
    n_days: int,
    tail: Tail | None = None,
    create: bool = True,
    publish: bool = True,
    storage_options: dict | None = None,
) -> list[dict]:
    """Create (or update) a pivot cube of n_days from the obs cubes, as the pivot flow does."""
    times = daily_times(START, START + dt.timedelta(days=n_days - 1))
    if create:
        tmpl = cube.template(EXTENT, times, pivot_variables(list(obs_urls)), {"title": "test"})
        layout = cube.pivot_layout(None, n_days)
        cube.create(pivot_url, tmpl, SIZE, storage_options=storage_options, layout=layout)
    obs = {m: cube.open_group(u, mode="r") for m, u in obs_urls.items()}
    pivot = cube.open_group(pivot_url, storage_options=storage_options)
    region = slice(0, SIZE)
    info = fill_region(obs, pivot, region, region, SIZE, SETTINGS, n_days, tail)
    if publish:
        cube.publish_days(pivot, times, {"period_end": str(times[-1])[:10]})
    return info


def run_folder(root: str, n_days: int = 60) -> Workspace:
    """A run folder (local or s3://) of one tile with obs cubes and an ingest result: what the
    pivot stage needs."""
    x0, y0, x1, y1 = TILE.bounds
    config = RunConfig.model_validate(
        {
            "name": "tiny",
            "source": {"kind": "static", "url": "/nowhere/catalog.json"},
            "grid": dataclasses.asdict(GRID),
            "region": {"bbox": [x0 + 10, y0 + 10, x1 - 10, y1 - 10], "crs": GRID.crs},
            "period": {"start": START, "end": START + dt.timedelta(days=n_days - 1)},
        }
    )
    ws = Workspace.open(config, root)
    days = {"s2": np.arange(0, n_days, 5), "s1": np.arange(1, n_days, 6)}
    modalities = {}
    for m, d in days.items():
        write_obs(ws.obs_url(m), m, d)
        modalities[m] = ModalityIngest(
            collection=m, items_found=len(d), items_used=len(d), item_ids=[f"{m}-{i}" for i in d],
            skipped_items=[], dates=len(d), tiles_written=[], tiles_already_done=[],
            cache_key="test", cube=ws.obs_url(m),
        )  # fmt: skip
    ws.write_result(IngestResult(tiles=[TILE.id], modalities=modalities, duration_s=0.0))
    return ws
