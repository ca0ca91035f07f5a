"""Gap filling onto a daily axis, behind a small pluggable interface; linear in time by default.

Two methods are registered: `linear` (the default) and `nearest` (each day takes the value of the
nearest valid observation in time, the earlier one on a tie). Both give the same age. `nearest`
draws each gap as two flat steps, which the cube's portable codecs (blosc byte-shuffle + zstd)
compress about as well as the observations themselves; a linear ramp they cannot predict, so
the linear pivot is about 2.5 times the obs cube on disk (see `tests/benchmarks/bench_pivot.py`).

A method turns observations on their own dates (band -> [T, ...] with NaN gaps) into daily values
plus the information age. The default, `linear`, is one compiled pass (numba, GIL released) that
walks the days once per block of pixels and emits every band of a modality at once, either as
float32 or directly as the cube's int16 encoding. `fill_chunked` runs a method over spatial
chunks on Dask threads (the compiled code releases the GIL, so chunks really run side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numba
import numpy as np

INT16_FILL = -32768
_BLOCK = 512  # pixels walked together: their state and output rows stay in cache


@dataclass(frozen=True)
class FillResult:
    """Daily values per band and the information age in days (NaN / fill where nothing was filled)."""

    values: dict[str, np.ndarray]  # band -> [D, ...] float32 (or int16 when encoded)
    age: np.ndarray  # [D, ...] float32 (or int16 when encoded), days to the nearest valid obs


@runtime_checkable
class GapFillMethod(Protocol):
    """What the pivot needs from a gap-filling method."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str:
        """Bumped when the method's output changes: it is part of the cube version."""
        ...

    def fill(
        self,
        obs: dict[str, np.ndarray],
        obs_day: np.ndarray,
        n_days: int,
        max_hold_days: int,
        age_cap_days: int,
        scales: dict[str, float] | None = None,
        out: FillResult | None = None,
    ) -> FillResult:
        """Daily values for days [0, n_days); `scales` asks for int16 = round(value / scale).

        With `out`, the result is written into its arrays ([n_days, ...], views allowed) and
        returned; that is how `fill_chunked` runs pixel ranges of one array side by side.
        """
        ...

    def first_changed_day(
        self, valid: np.ndarray, obs_day: np.ndarray, first_new_day: int, max_hold_days: int
    ) -> int:
        """Earliest day whose output may change when observations on days >= first_new_day change."""
        ...


@dataclass(frozen=True)
class LinearFill:
    """Linear in time between valid observations; ends held for at most max_hold_days."""

    name: str = "linear"
    version: str = "1"
    description: str = "linear in time between valid observations; ends held for max_hold_days"

    def fill(
        self, obs, obs_day, n_days, max_hold_days, age_cap_days, scales=None, out=None
    ) -> FillResult:
        """See `linear_fill`."""
        return linear_fill(obs, obs_day, n_days, max_hold_days, age_cap_days, scales, out)

    def first_changed_day(self, valid, obs_day, first_new_day, max_hold_days) -> int:
        """Day after each pixel's last valid observation before first_new_day (earliest of all).

        A pixel with none before it only changes within max_hold_days of the new observation.
        """
        before = np.asarray(obs_day) < first_new_day
        if valid.size == 0:
            return max(0, first_new_day - max_hold_days)
        flat = valid.reshape(valid.shape[0], -1)[before]
        days = np.asarray(obs_day)[before]
        seen = flat.any(axis=0)
        if not seen.all():
            return max(0, first_new_day - max_hold_days)
        last = flat.shape[0] - 1 - np.argmax(flat[::-1], axis=0)
        return int(days[last].min()) + 1


@dataclass(frozen=True)
class NearestFill(LinearFill):
    """The nearest valid observation in time (the earlier on a tie); ends held as `linear` does.

    Its output changes from the same day as `linear`'s when observations arrive (the day after
    each pixel's last earlier one), so `first_changed_day` is shared.
    """

    name: str = "nearest"
    version: str = "1"
    description: str = (
        "the nearest valid observation in time (the earlier on a tie); ends held for max_hold_days"
    )

    def fill(
        self, obs, obs_day, n_days, max_hold_days, age_cap_days, scales=None, out=None
    ) -> FillResult:
        """See `linear_fill` (`nearest=True`)."""
        return linear_fill(
            obs, obs_day, n_days, max_hold_days, age_cap_days, scales, out, nearest=True
        )


METHODS: dict[str, GapFillMethod] = {}


def register_method(method: GapFillMethod) -> GapFillMethod:
    """Make `method` selectable by name (`pivot.method` in a run config)."""
    if not isinstance(method, GapFillMethod):
        raise TypeError(f"{method!r} does not implement GapFillMethod (name, version, fill, ...)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> GapFillMethod:
    """The registered method called `name`; the error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown gap-filling method {name!r}; known: {known}") from None


register_method(LinearFill())
register_method(NearestFill())


def linear_fill(
    obs: dict[str, np.ndarray],
    obs_day: np.ndarray,
    n_days: int,
    max_hold_days: int,
    age_cap_days: int = 366,
    scales: dict[str, float] | None = None,
    out: FillResult | None = None,
    *,
    nearest: bool = False,
) -> FillResult:
    """Fill `obs` (band -> [T, ...] with NaN gaps, observed on day indices `obs_day`) daily.

    A day is valid for the modality where every band is finite. Between two valid observations
    values are interpolated linearly; before the first / after the last one the nearest value is
    held for at most `max_hold_days`, then left NaN. Observations outside [0, n_days) are used
    as anchors for interpolation but not emitted. With `scales` (band -> scale factor, plus
    "age") the output is the int16 code `value / scale` with -32768 where nothing was filled;
    there a gap is drawn with an integer step per day from the rounded earlier observation
    (the slope rounded to one code unit per day, so the error on a day k days into a gap is at
    most k/2 units, e.g. 0.0002 reflectance 4 days in): a second delta along time then turns
    an interpolated stretch into zeros, which is what makes the daily cube small.

    The obs may be views (e.g. a pixel range of a bigger array: nothing is copied but the valid
    dates); `out` (arrays [n_days, ...] of the right dtype, views allowed) is written in place
    instead of allocating, which is how `fill_chunked` runs chunks side by side.

    With `nearest`, a day between two valid observations takes the value of the nearer one (the
    earlier on a tie) instead of the line between them; ages and holds are the same.
    """
    bands = list(obs)
    if not bands:
        raise ValueError("linear_fill needs at least one band")
    obs_day = np.asarray(obs_day, dtype=np.int64)
    arrays = [np.asarray(obs[b]) for b in bands]
    space = arrays[0].shape[1:]
    if arrays[0].shape[0] != obs_day.size:
        raise ValueError(f"obs have {arrays[0].shape[0]} dates but obs_day has {obs_day.size}")
    flat = [_as_2d(a) for a in arrays]
    order = np.argsort(obs_day, kind="stable")
    order = order[_dates_with_data(flat[0], order)]  # dates where no pixel has data carry nothing
    stack = np.stack([a[order].astype(np.float32, copy=False) for a in flat])
    encode = scales is not None
    inv = np.array([1.0 / (scales or {}).get(b, 1.0) for b in [*bands, "age"]], dtype=np.float64)
    dtype = np.int16 if encode else np.float32
    if out is None:
        out = FillResult(
            {b: np.empty((n_days, *space), dtype) for b in bands}, np.empty((n_days, *space), dtype)
        )
    targets = [_flat_view(out.values[b]) for b in bands]
    age = _flat_view(out.age)
    if any(t.dtype != dtype or t.shape != (n_days, stack.shape[2]) for t in [*targets, age]):
        raise ValueError(f"out arrays must be {dtype.__name__} [{n_days}, {space}]")
    if order.size == 0:  # nothing observed: nothing filled
        for t in [*targets, age]:
            t[...] = INT16_FILL if encode else np.nan
        return out
    valid = np.isfinite(stack).all(axis=0)
    _fill_kernel(
        stack,
        valid,
        obs_day[order],
        max_hold_days,
        age_cap_days,
        inv,
        encode,
        nearest,
        tuple(targets),
        age,
    )
    return out


def _as_2d(a: np.ndarray) -> np.ndarray:
    """[T, ...] as [T, pixels]; a copy only where the layout needs one."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1)


def _flat_view(a: np.ndarray) -> np.ndarray:
    """An output [n_days, ...] as a [n_days, pixels] view of the same memory (never a copy)."""
    flat = a.view()
    try:
        flat.shape = (a.shape[0], -1)  # refuses instead of copying
    except AttributeError:
        raise ValueError("out arrays must flatten to [days, pixels] without a copy") from None
    return flat


def fill_chunked(
    method: GapFillMethod,
    obs: dict[str, np.ndarray],
    obs_day: np.ndarray,
    n_days: int,
    max_hold_days: int,
    age_cap_days: int,
    scales: dict[str, float] | None = None,
    chunks: int | None = None,
) -> FillResult:
    """`method.fill` on [T, y, x] obs in pixel-range chunks run side by side on Dask threads.

    The outputs are allocated once and every chunk writes its own range of them in place
    (methods take `out=`): nothing is copied or concatenated around the kernel.
    `chunks` defaults to one per core.
    """
    import os

    import dask

    first = next(iter(obs.values()))
    space, n_px = first.shape[1:], int(np.prod(first.shape[1:]))
    flat = {b: _as_2d(v) for b, v in obs.items()}
    dtype = np.int16 if scales is not None else np.float32
    out = FillResult(
        {b: np.empty((n_days, *space), dtype) for b in obs}, np.empty((n_days, *space), dtype)
    )
    rows = {b: _flat_view(v) for b, v in out.values.items()}
    age = _flat_view(out.age)
    n_chunks = max(1, min(chunks or os.cpu_count() or 1, n_px))
    edges = np.linspace(0, n_px, n_chunks + 1).astype(int)
    tasks = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        part = FillResult({b: v[:, lo:hi] for b, v in rows.items()}, age[:, lo:hi])
        args = ({b: v[:, lo:hi] for b, v in flat.items()}, obs_day, n_days, max_hold_days)
        tasks.append(dask.delayed(method.fill)(*args, age_cap_days, scales, out=part))
    dask.compute(*tasks, scheduler="threads", num_workers=n_chunks)
    return out


@numba.njit(cache=True, nogil=True)
def _dates_with_data(values, order):  # pragma: no cover
    """Per date in `order`: does any pixel hold a finite value (stops at the first one)."""
    keep = np.zeros(order.size, np.bool_)
    for j in range(order.size):
        row = values[order[j]]
        for p in range(row.size):
            if np.isfinite(row[p]):
                keep[j] = True
                break
    return keep


@numba.njit(cache=True, nogil=True)
def _fill_kernel(
    values, valid, obs_day, max_hold, age_cap, inv, encode, nearest, out, age
):  # pragma: no cover
    """out[b][d, p], age[d, p] from values[b, t, p] on sorted obs_day[t]; one walk per block.

    Per pixel the bracketing valid observations (lo, hi) change only on observation days, so
    they are updated there; every other day costs one multiply-add per band: `base + step * w`
    with w the days since lo (linear) or 0 / 1 before / past the midpoint (nearest, where
    step is the whole jump from lo to hi).
    """
    n_bands, n_obs, n_px = values.shape
    n_days = age.shape[0]
    far = 1 << 40
    for blk in range((n_px + _BLOCK - 1) // _BLOCK):
        p0 = blk * _BLOCK
        n = min(_BLOCK, n_px - p0)
        prev = np.full(n, -1, np.int64)
        lo = np.zeros(n, np.int64)
        hi = np.zeros(n, np.int64)
        pd = np.full(n, -far, np.int64)
        nd = np.full(n, far, np.int64)
        slope = np.zeros(n, np.float64)
        w = np.empty(n, np.float64)
        ages = np.empty(n, np.float64)
        ok = np.empty(n, np.bool_)
        base = np.zeros((n_bands, n), np.float64)
        step = np.zeros((n_bands, n), np.float64)
        t = 0
        for d in range(n_days):
            if d == 0 or (t < n_obs and obs_day[t] <= d):
                while t < n_obs and obs_day[t] <= d:
                    for i in range(n):
                        if valid[t, p0 + i]:
                            prev[i] = t
                    t += 1
                _bracket(prev, t, valid, p0, obs_day, lo, hi, pd, nd, slope, far)
                for b in range(n_bands):
                    for i in range(n):
                        vp = values[b, lo[i], p0 + i]
                        vh = values[b, hi[i], p0 + i]
                        if nearest:  # in float64: base + step is then exactly vh
                            fp, fh = np.float64(vp), np.float64(vh)
                            base[b, i] = np.round(fp * inv[b]) if encode else fp
                            step[b, i] = np.round(fh * inv[b]) - base[b, i] if encode else fh - fp
                            continue
                        per_day = (vh - vp) * slope[i]
                        if encode:  # integer start and integer step per day: see linear_fill
                            base[b, i] = np.round(vp * inv[b])
                            step[b, i] = np.round(per_day * inv[b])
                        else:
                            base[b, i] = vp
                            step[b, i] = per_day
            for i in range(n):
                k = d - pd[i]
                a = min(k, nd[i] - d)
                ok[i] = (slope[i] > 0.0) | (a <= max_hold)
                if nearest:
                    k = 1 if nd[i] - d < k else 0  # past the midpoint: the later observation
                w[i] = k if ok[i] else np.nan  # NaN makes every band and the age unfilled
                ages[i] = min(a, age_cap) if ok[i] else np.nan
            for b in range(n_bands):
                row = out[b]
                if encode:
                    for i in range(n):
                        row[d, p0 + i] = _code(base[b, i] + step[b, i] * w[i])
                else:
                    for i in range(n):
                        row[d, p0 + i] = base[b, i] + step[b, i] * w[i]
            if encode:
                for i in range(n):
                    age[d, p0 + i] = _code(np.round(ages[i] * inv[n_bands]))
            else:
                for i in range(n):
                    age[d, p0 + i] = ages[i]


@numba.njit(inline="always")
def _bracket(prev, t, valid, p0, obs_day, lo, hi, pd, nd, slope, far):  # pragma: no cover
    """Per pixel: valid slots before/after (lo, hi), their days, and 1/span when both exist."""
    n_obs = valid.shape[0]
    for i in range(prev.size):
        k = t
        while k < n_obs and not valid[k, p0 + i]:
            k += 1
        has_prev, has_next = prev[i] >= 0, k < n_obs
        lo[i] = prev[i] if has_prev else min(k, n_obs - 1)
        hi[i] = k if has_next else lo[i]
        pd[i] = obs_day[prev[i]] if has_prev else -far
        nd[i] = obs_day[k] if has_next else far
        slope[i] = 1.0 / (nd[i] - pd[i]) if has_prev and has_next else 0.0


@numba.njit(inline="always")
def _code(v):  # pragma: no cover
    """An integral value as its int16 code (clipped), -32768 for NaN."""
    if np.isnan(v):
        return INT16_FILL
    return min(max(v, -32767.0), 32767.0)
