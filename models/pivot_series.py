"""A pixel's daily pivot series -> the network's input, with numpy and the standard library only.

This file travels with every registered model (MLflow `code_paths`) and runs where pivotmap is
not installed, so it imports nothing of pivotmap. pivotmap's own training and prediction prepare
pixels through the same functions (`models/features.py`), so both sides feed the network alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def sample_days(n_days: int, step_days: int) -> np.ndarray:
    """Indices of the days the network sees on a daily axis: the first day, then every step."""
    return np.arange(0, n_days, step_days)


def day_of_year(dates: np.ndarray) -> np.ndarray:
    """Day of year (1–366) of datetime64 dates, as pandas' `dt.dayofyear` counts it."""
    days = np.asarray(dates).astype("datetime64[D]")
    return (days - days.astype("datetime64[Y]")).astype(np.int64) + 1


def network_input(
    series: np.ndarray,
    doy: np.ndarray,
    names: Sequence[str],
    norm_mean: Mapping[str, float],
    norm_std: Mapping[str, float],
    age_cap: float,
) -> np.ndarray:
    """[N, T, len(names) + 2] float32: bands normalised, ages scaled to [0, 1] (1 = nothing
    known), missing values at 0, then sin/cos of the day of year.

    Args:
        series: [N, T, len(names)] float32 with NaN for missing values, channels `names`.
        doy: [T] day of year of each step (or [N, T]: each pixel's own, e.g. several years).
    """
    x = np.empty((series.shape[0], series.shape[1], len(names) + 2), dtype=np.float32)
    for c, name in enumerate(names):
        values = series[:, :, c]
        if name.startswith("age_"):
            x[:, :, c] = np.where(np.isfinite(values), np.minimum(values, age_cap) / age_cap, 1.0)
        else:
            scaled = (values - norm_mean.get(name, 0.0)) / norm_std.get(name, 1.0)
            x[:, :, c] = np.where(np.isfinite(scaled), scaled, 0.0)
    angle = 2 * np.pi * np.asarray(doy).astype(np.float32) / 365.25  # [T], or [N, T] per pixel
    x[:, :, -2] = np.sin(angle)
    x[:, :, -1] = np.cos(angle)
    return x


def has_data(series: np.ndarray) -> np.ndarray:
    """Pixels with at least one finite value in any band: only those get a class."""
    return np.isfinite(series).any(axis=(1, 2))


def shift_series(series: np.ndarray, steps: int) -> np.ndarray:
    """[N, T, C] series moved `steps` steps later along T (earlier when negative), the first or
    last step repeated into the gap it leaves; the days of year stay where they were. This is
    how pivotmap's predict aligns a region's season with the model's (`models/calendar.py`),
    and what the pyfunc's `calendar_shift_days` parameter applies."""
    if steps == 0:
        return series
    if abs(steps) >= series.shape[1]:
        raise ValueError(f"a shift of {steps} steps does not fit a series of {series.shape[1]}")
    moved = np.empty_like(series)
    if steps > 0:
        moved[:, steps:] = series[:, :-steps]
        moved[:, :steps] = series[:, :1]
    else:
        moved[:, :steps] = series[:, -steps:]
        moved[:, steps:] = series[:, -1:]
    return moved
