"""Build a tile of the pivotal cube: every modality on one daily axis, gap-filled, with age."""

from __future__ import annotations

import datetime as dt

import numpy as np
import xarray as xr

from pivotmap.tasks.gapfill import linear_fill

AGE_ATTRS = (
    "age_<modality> = days from this day to the nearest valid observation of that modality "
    "(0 = observed that day; always >= 0, capped at age_cap_days; NaN where no value was filled)"
)


def daily_times(start: dt.date, end: dt.date) -> np.ndarray:
    """The pivot's time axis: every day from start to end inclusive."""
    return np.arange(np.datetime64(start, "D"), np.datetime64(end, "D") + 1).astype(
        "datetime64[ns]"
    )


def pivot_tile(
    modalities: dict[str, xr.Dataset | None],
    start: dt.date,
    end: dt.date,
    max_hold_days: int,
    age_cap_days: int,
) -> xr.Dataset:
    """Gap-fill each modality (`{"s2": obs, "s1": obs}`) onto the daily axis of [start, end]."""
    times = daily_times(start, end)
    origin = np.datetime64(start, "D")
    out: dict[str, xr.DataArray] = {}
    coords = None
    for name, obs in modalities.items():
        if obs is None:
            continue
        coords = {"y": obs.y, "x": obs.x}
        obs_day = (obs.time.values.astype("datetime64[D]") - origin).astype(np.int64)
        arrays = {v: obs[v].values for v in obs.data_vars}
        filled = linear_fill(arrays, obs_day, len(times), max_hold_days, age_cap_days)
        for var, values in filled.values.items():
            out[var] = xr.DataArray(values, dims=("time", "y", "x"))
        out[f"age_{name}"] = xr.DataArray(filled.age, dims=("time", "y", "x"))
    if coords is None:
        raise ValueError("pivot_tile needs at least one modality with observations")
    return xr.Dataset(out, coords={"time": times, **coords})
