"""Build the pivotal cube block by block: every modality on one daily axis, gap-filled, with age.

A block is one shard-sized window of a tile: it reads its obs (all dates, so interpolation has
its anchors), fills days [first_day, n_days) with the configured method and writes int16 codes
straight into the cube. Blocks never share a shard, so they run in parallel on Dask.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import xarray as xr

from pivotmap.tasks import cube
from pivotmap.tasks.gapfill import INT16_FILL, get_method, linear_fill
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

MODALITY_VARIABLES = {"s2": list(S2_VARIABLES), "s1": list(S1_VARIABLES)}
AGE_ATTRS = (
    "age_<modality> = days from this day to the nearest valid observation of that modality, "
    "before or after it (0 = observed that day; never negative: the direction is not encoded; "
    "capped at age_cap_days; _FillValue where no value was filled)"
)


@dataclass(frozen=True)
class FillSettings:
    """What decides the filled values: method, hold limit, age cap and the first day."""

    method: str
    max_hold_days: int
    age_cap_days: int
    start: dt.date


@dataclass(frozen=True)
class Tail:
    """An in-place update: the days the cube had, and per modality the first new obs day."""

    old_days: int
    changed_from: dict[str, int | None]  # None: that modality has no new observations


@dataclass(frozen=True)
class Block:
    """One shard-sized window of the cube (rows, cols in cube pixels)."""

    rows: slice
    cols: slice


def daily_times(start: dt.date, end: dt.date) -> np.ndarray:
    """The pivot's time axis: every day from start to end inclusive."""
    return np.arange(np.datetime64(start, "D"), np.datetime64(end, "D") + 1).astype(
        "datetime64[ns]"
    )


def blocks_of(rows: slice, cols: slice, shard_xy: int) -> list[Block]:
    """Split a tile's window into shard-aligned blocks."""
    return [
        Block(slice(r, min(r + shard_xy, rows.stop)), slice(c, min(c + shard_xy, cols.stop)))
        for r in range(rows.start, rows.stop, shard_xy)
        for c in range(cols.start, cols.stop, shard_xy)
    ]


def obs_days(group, start: dt.date) -> np.ndarray:
    """Day index (0 = `start`) of every date of an obs cube."""
    days = np.asarray(group["time"][:], dtype=np.int64)
    return days - (np.datetime64(start, "D") - np.datetime64("1970-01-01", "D")).astype(np.int64)


def build_block(
    obs: dict[str, object],
    pivot,
    block: Block,
    settings: FillSettings,
    n_days: int,
    tail: Tail | None = None,
) -> dict:
    """Fill one block and write it; returns the first day written and valid fractions.

    With `tail` this is an update: only the days the new observations can change and the days
    past the old end are recomputed. Without it the block is filled from day 0.
    """
    method = get_method(settings.method)
    inputs = {}
    for m, group in obs.items():
        names = [v for v in MODALITY_VARIABLES[m] if v in pivot]
        inputs[m] = (
            obs_days(group, settings.start),
            cube.read_block(group, names, block.rows, block.cols),
        )
    first = 0 if tail is None else _first_day(method, inputs, tail, settings)
    encoded, valid = {}, {}
    for m, (days, values) in inputs.items():
        scales = {v: cube.VARIABLES[v].scale for v in values} | {"age": 1.0}
        res = method.fill(
            values,
            days - first,
            n_days - first,
            settings.max_hold_days,
            settings.age_cap_days,
            scales,
        )
        encoded |= res.values | {f"age_{m}": res.age}
        valid[f"valid_{m}"] = float((res.age != INT16_FILL).mean()) if res.age.size else 0.0
    if first < n_days:
        cube.write_block(pivot, encoded, first, block.rows, block.cols, n_days)
    return {"first_day": first, **valid}


def fill_region(
    obs: dict[str, object],
    pivot,
    rows: slice,
    cols: slice,
    shard_xy: int,
    settings: FillSettings,
    n_days: int,
    tail: Tail | None = None,
) -> list[dict]:
    """`build_block` over the shard-aligned blocks of a window, in parallel on Dask threads."""
    import dask

    tasks = [
        dask.delayed(build_block)(obs, pivot, b, settings, n_days, tail)
        for b in blocks_of(rows, cols, shard_xy)
    ]
    return list(dask.compute(*tasks, scheduler="threads"))


def _first_day(method, inputs, tail: Tail, settings) -> int:
    """Earliest day of this block that new observations or new days change."""
    first = tail.old_days
    for m, (days, values) in inputs.items():
        new = tail.changed_from.get(m)
        if new is None:
            continue
        valid = np.all([np.isfinite(v) for v in values.values()], axis=0)
        first = min(first, method.first_changed_day(valid, days, new, settings.max_hold_days))
    return max(0, first)


def pivot_tile(
    modalities: dict[str, xr.Dataset | None],
    start: dt.date,
    end: dt.date,
    max_hold_days: int,
    age_cap_days: int,
) -> xr.Dataset:
    """In memory: gap-fill each modality (`{"s2": obs, "s1": obs}`) onto the days of [start, end]."""
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


@dataclass(frozen=True)
class CubeState:
    """What a pivot cube holds: settings key, last day, and the obs dates/items per modality."""

    version: str
    base_key: str  # grid, first day, variables and fill settings: must match to update in place
    end: dt.date
    dates: dict[str, tuple[str, ...]]  # modality -> ISO obs dates used
    items: dict[str, str]  # modality -> hash of the item ids used

    def attrs(self) -> dict:
        """The state as cube attributes (JSON)."""
        out = {"cube_version": self.version, "base_key": self.base_key}
        out["period_end"] = self.end.isoformat()
        for m in self.dates:
            out[f"obs_dates_{m}"] = list(self.dates[m])
            out[f"obs_items_{m}"] = self.items[m]
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> CubeState | None:
        """The state recorded in a cube's attributes, or None for a cube without one."""
        try:
            mods = [k.removeprefix("obs_items_") for k in attrs if k.startswith("obs_items_")]
            return cls(
                version=attrs["cube_version"],
                base_key=attrs["base_key"],
                end=dt.date.fromisoformat(attrs["period_end"]),
                dates={m: tuple(attrs[f"obs_dates_{m}"]) for m in mods},
                items={m: attrs[f"obs_items_{m}"] for m in mods},
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class UpdatePlan:
    """How to bring a cube to a target state."""

    mode: str  # "current" | "update" | "create"
    reason: str
    tail: Tail | None = None  # set for "update"


def plan_update(current: CubeState | None, target: CubeState, start: dt.date) -> UpdatePlan:
    """Nothing to do, an in-place update of the tail, or a rebuild (with the reason)."""
    if current is None:
        return UpdatePlan("create", "no cube yet")
    if current.base_key != target.base_key:
        return UpdatePlan("create", "grid, first day, variables or fill settings changed")
    if target.end < current.end:
        return UpdatePlan("create", f"period now ends {target.end}, before {current.end}")
    if set(current.dates) != set(target.dates):
        return UpdatePlan("create", "the modalities changed")
    changed: dict[str, int | None] = {}
    for m, dates in target.dates.items():
        old, new = set(current.dates[m]), set(dates)
        if old == new and current.items[m] == target.items[m]:
            changed[m] = None
        elif old < new:
            first_new = dt.date.fromisoformat(min(new - old))
            changed[m] = (first_new - start).days
        else:
            why = "dates were removed" if not old <= new else "items on known dates changed"
            return UpdatePlan("create", f"{m}: {why}")
    if target.end == current.end and all(v is None for v in changed.values()):
        return UpdatePlan("current", "no new observations or days")
    tail = Tail((current.end - start).days + 1, changed)
    return UpdatePlan("update", f"new days to {target.end} / new observations", tail)
