"""The baseline a mapping centre runs today: a random forest on per-pixel temporal features.

Features follow iota2's practice: the gap-filled bands every ~10 days, spectral indices
(NDVI, NDWI, NDBI) and the S1 cross-ratio over time, plus their yearly statistics. They come
from the same pivot cube, pixels and split as the neural network, so the scores compare.
"""

from __future__ import annotations

import numpy as np

from pivotmap.models.network import S1_BANDS, S2_BANDS

MISSING = -9999.0  # a value no band takes: trees split it off
INDICES = {"ndvi": ("B08", "B04"), "ndwi": ("B03", "B08"), "ndbi": ("B11", "B08")}


def temporal_features(series: np.ndarray, channels: tuple[str, ...], every: int) -> np.ndarray:
    """[N, T, C] raw series (NaN = missing) -> [N, F] float32 features, sampled every `every`
    steps; missing values become `MISSING`."""
    if series.ndim != 3 or series.shape[2] != len(channels):
        raise ValueError(f"series must be [N, T, {len(channels)}], got {series.shape}")
    col = {name: series[:, ::every, i] for i, name in enumerate(channels)}
    parts = [col[b] for b in (*S2_BANDS, *S1_BANDS) if b in col]
    curves = [
        _normalised_difference(col[a], col[b]) for a, b in INDICES.values() if {a, b} <= set(col)
    ]
    if {"VV", "VH"} <= set(col):
        curves.append(col["VH"] - col["VV"])  # dB: the cross-polarisation ratio
    parts += curves
    for curve in curves:
        parts.append(_yearly_statistics(curve))
    with np.errstate(invalid="ignore"):
        features = np.concatenate(parts, axis=1).astype(np.float32)
    return np.where(np.isfinite(features), features, MISSING)


def _normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a - b) / (a + b)


def _yearly_statistics(curve: np.ndarray) -> np.ndarray:
    """Mean, std, min, max, 10th and 90th percentiles and the step of the maximum, per pixel."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels give NaN, then MISSING
        stats = [
            np.nanmean(curve, 1),
            np.nanstd(curve, 1),
            np.nanmin(curve, 1),
            np.nanmax(curve, 1),
            *np.nanpercentile(curve, [10, 90], axis=1),
        ]
    peak = np.argmax(np.where(np.isfinite(curve), curve, -np.inf), axis=1).astype(np.float32)
    return np.stack([*stats, peak], axis=1)


def fit_random_forest(features: np.ndarray, codes: np.ndarray, *, trees: int, seed: int):
    """A class-balanced random forest (scikit-learn) on [N, F] features and class codes."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(
        n_estimators=trees, class_weight="balanced", n_jobs=-1, random_state=seed
    )
    return forest.fit(features, codes)
