"""Gap filling onto a daily axis: linear in time between valid observations, per pixel.

Vectorised over pixels: the previous and next valid day of every (day, pixel) are found with one
cumulative max/min each along time, shared by all bands of a modality, so the cost is a few
passes over the array whatever the gap pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FillResult:
    """Daily values per band and the information age in days (NaN where nothing was filled)."""

    values: dict[str, np.ndarray]  # band -> [D, ...] float32
    age: np.ndarray  # [D, ...] float32, days to the nearest valid observation


def linear_fill(
    obs: dict[str, np.ndarray],
    obs_day: np.ndarray,
    n_days: int,
    max_hold_days: int,
    age_cap_days: int = 366,
) -> FillResult:
    """Fill `obs` (band -> [T, ...] with NaN gaps, observed on day indices `obs_day`) daily.

    A day is valid for the modality where every band is finite. Between two valid observations
    values are interpolated linearly; before the first / after the last one the nearest value is
    held for at most `max_hold_days`, then left NaN. Observations outside [0, n_days) are used
    as anchors for interpolation but not emitted.
    """
    bands = list(obs)
    valid = np.all([np.isfinite(obs[b]) for b in bands], axis=0)  # [T, ...]
    obs_day = np.asarray(obs_day, dtype=np.int64)
    order = np.argsort(obs_day, kind="stable")
    obs_day, valid = obs_day[order], valid[order]
    prev_i, next_i = _neighbours(valid)  # indices into the obs axis, per (obs slot, pixel)
    days = np.arange(n_days)
    slot = np.searchsorted(obs_day, days, side="right") - 1  # last obs at or before each day
    prev_at, next_at = _neighbours_for_days(prev_i, next_i, slot, obs_day, days, valid)
    prev_day = _day_of(prev_at, obs_day)
    next_day = _day_of(next_at, obs_day)
    d = days.reshape((-1,) + (1,) * (valid.ndim - 1)).astype(np.float64)
    has_prev, has_next = prev_at >= 0, next_at >= 0
    both = has_prev & has_next
    span = np.where(both, next_day - prev_day, 1.0)
    w = np.where(both, (d - prev_day) / np.where(span == 0, 1.0, span), 0.0).astype(np.float32)
    hold_prev = has_prev & ~has_next & (d - prev_day <= max_hold_days)
    hold_next = has_next & ~has_prev & (next_day - d <= max_hold_days)
    values = {}
    for b in bands:
        series = obs[b][order].astype(np.float32)
        vp = _gather(series, prev_at)
        vn = _gather(series, next_at)
        filled = np.where(both, vp + w * (vn - vp), np.nan)
        filled = np.where(hold_prev, vp, filled)
        values[b] = np.where(hold_next, vn, filled).astype(np.float32)
    age = np.minimum(
        np.where(has_prev, d - prev_day, np.inf), np.where(has_next, next_day - d, np.inf)
    )
    filled_any = both | hold_prev | hold_next
    age = np.where(filled_any, np.minimum(age, age_cap_days), np.nan).astype(np.float32)
    return FillResult(values=values, age=age)


def _neighbours(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per obs slot: index of the last valid slot at or before it, and the first at or after it."""
    t = valid.shape[0]
    idx = np.arange(t).reshape((-1,) + (1,) * (valid.ndim - 1))
    prev_i = np.maximum.accumulate(np.where(valid, idx, -1), axis=0)
    nxt = np.where(valid, idx, t)
    next_i = np.flip(np.minimum.accumulate(np.flip(nxt, axis=0), axis=0), axis=0)
    return prev_i, np.where(next_i == t, -1, next_i)


def _neighbours_for_days(prev_i, next_i, slot, obs_day, days, valid):
    """Map per-slot neighbours to per-day ones (a day between slots looks at the next slot)."""
    t = valid.shape[0]
    before = np.clip(slot, 0, t - 1)
    prev_at = np.where((slot >= 0).reshape((-1,) + (1,) * (valid.ndim - 1)), prev_i[before], -1)
    after_slot = np.where((slot >= 0) & (obs_day[before] == days), slot, slot + 1)
    inside = (after_slot < t).reshape((-1,) + (1,) * (valid.ndim - 1))
    next_at = np.where(inside, next_i[np.clip(after_slot, 0, t - 1)], -1)
    return prev_at, next_at


def _day_of(at: np.ndarray, obs_day: np.ndarray) -> np.ndarray:
    return np.where(at >= 0, obs_day[np.clip(at, 0, None)], 0).astype(np.float64)


def _gather(series: np.ndarray, at: np.ndarray) -> np.ndarray:
    return np.take_along_axis(series, np.clip(at, 0, None), axis=0)
