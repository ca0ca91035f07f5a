"""Pixel time series from the pivotal cube, normalised for the network: [N, T, C] float32."""

from __future__ import annotations

import numpy as np
import xarray as xr

from pivotmap.models import pivot_series
from pivotmap.models.network import ModelSpec


def raw_series(ds: xr.Dataset, channels: tuple[str, ...]) -> np.ndarray:
    """[N, T, C] with NaN for missing values; a variable absent from the cube is all NaN."""
    t, h, w = ds.sizes["time"], ds.sizes["y"], ds.sizes["x"]
    out = np.full((h * w, t, len(channels)), np.nan, dtype=np.float32)
    for c, name in enumerate(channels):
        if name in ds:
            values = ds[name].transpose("time", "y", "x").values
            out[:, :, c] = values.reshape(t, h * w).T
    return out


def fit_normalisation(series: np.ndarray, spec: ModelSpec) -> ModelSpec:
    """Mean and std of each band over the training pixels (ages are scaled by the cap instead)."""
    names = (*spec.s2_channels, *spec.s1_channels)
    mean, std = {}, {}
    for c, name in enumerate(names):
        if not name.startswith("age_"):
            mean[name], std[name] = channel_statistics(series[:, :, c])
    return ModelSpec(**{**spec.to_dict(), "norm_mean": mean, "norm_std": std})


def channel_statistics(values: np.ndarray) -> tuple[float, float]:
    """Mean and std of a channel's finite values (0 and 1 when there are too few)."""
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else 0.0
    std = float(finite.std()) if finite.size > 1 and finite.std() > 0 else 1.0
    return mean, std


def network_input(series: np.ndarray, doy: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Normalise bands, scale ages to [0, 1] (1 = nothing known), zero missing values, add doy
    (`pivot_series`: the code that also travels with the registered model)."""
    names = (*spec.s2_channels, *spec.s1_channels)
    return pivot_series.network_input(
        series, doy, names, spec.norm_mean, spec.norm_std, spec.age_cap
    )


def has_data(series: np.ndarray) -> np.ndarray:
    """Pixels with at least one finite value in any band: only those get a class."""
    return pivot_series.has_data(series)


def day_of_year(ds: xr.Dataset) -> np.ndarray:
    return pivot_series.day_of_year(ds.time.values)


def window_inputs(
    ds: xr.Dataset, spec: ModelSpec, shift_steps: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs of the pixels with data in a window sampled every `spec.step_days`, and
    that mask (flat, row-major): what predict, concept maps and explanations feed the model.
    `shift_steps` moves the series that many steps later (`models.calendar.shift_series`)."""
    from pivotmap.models.calendar import shift_series

    series = raw_series(ds, spec.channels[:-2])
    ok = has_data(series)
    return network_input(shift_series(series[ok], shift_steps), day_of_year(ds), spec), ok
