"""Pixel time series from the pivotal cube, normalised for the network: [N, T, C] float32."""

from __future__ import annotations

import numpy as np
import xarray as xr

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
        if name.startswith("age_"):
            continue
        values = series[:, :, c]
        finite = values[np.isfinite(values)]
        mean[name] = float(finite.mean()) if finite.size else 0.0
        std[name] = float(finite.std()) if finite.size > 1 and finite.std() > 0 else 1.0
    return ModelSpec(**{**spec.to_dict(), "norm_mean": mean, "norm_std": std})


def network_input(series: np.ndarray, doy: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Normalise bands, scale ages to [0, 1] (1 = nothing known), zero missing values, add doy."""
    names = (*spec.s2_channels, *spec.s1_channels)
    x = np.empty((series.shape[0], series.shape[1], len(names) + 2), dtype=np.float32)
    for c, name in enumerate(names):
        values = series[:, :, c]
        if name.startswith("age_"):
            x[:, :, c] = np.where(
                np.isfinite(values), np.minimum(values, spec.age_cap) / spec.age_cap, 1.0
            )
        else:
            scaled = (values - spec.norm_mean.get(name, 0.0)) / spec.norm_std.get(name, 1.0)
            x[:, :, c] = np.where(np.isfinite(scaled), scaled, 0.0)
    angle = 2 * np.pi * doy.astype(np.float32) / 365.25
    x[:, :, -2] = np.sin(angle)[None, :]
    x[:, :, -1] = np.cos(angle)[None, :]
    return x


def has_data(series: np.ndarray) -> np.ndarray:
    """Pixels with at least one finite value in any band: only those get a class."""
    return np.isfinite(series).any(axis=(1, 2))


def day_of_year(ds: xr.Dataset) -> np.ndarray:
    return ds.time.dt.dayofyear.values
