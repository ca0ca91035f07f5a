"""Small generated obs cubes and a pivot build that mirrors the pivot flow, for the cube tests."""

from __future__ import annotations

import datetime as dt

import numpy as np
import xarray as xr

from pivotmap.flows.pivot import pivot_variables
from pivotmap.tasks import cube
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.pivot import FillSettings, Tail, daily_times, fill_region
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

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
