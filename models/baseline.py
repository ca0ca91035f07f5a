"""The baselines a mapping centre runs today: trees on per-pixel features of the pivot cube.

Two feature sets, from the same pivot cube, pixels and split as the neural network, so the
scores compare:

- `percentile_features` (the default, calendar-free, as ESA WorldCereal and iota2 use them
  for transfer): per band and index, the 10/25/50/75/90th percentiles, mean and std of the
  clear observations of the year (age 0 in the pivot). They do not say *when* a value was seen,
  so a season that comes earlier or later elsewhere, or another year, moves them little.
- `temporal_features` (date-indexed, iota2's classic practice): the gap-filled bands every
  ~10 days, spectral indices (NDVI, NDWI, NDBI) and the S1 cross-ratio over time, plus their
  yearly statistics. Strong in the region and year it learnt, fragile elsewhere (issue 15).
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


def fit_gradient_boosting(features: np.ndarray, codes: np.ndarray, *, trees: int, seed: int):
    """Class-balanced histogram gradient-boosted trees (scikit-learn) with `trees` boosting
    rounds, early-stopped on a tenth of the pixels."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=trees, learning_rate=0.1, class_weight="balanced", random_state=seed,
        early_stopping=len(codes) > 1000,
    )  # fmt: skip
    return model.fit(features, codes)


PERCENTILES = (10, 25, 50, 75, 90)
MIN_CLEAR = 3  # fewer clear observations than this: the gap-filled series stands in


def percentile_features(series: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    """[N, T, C] raw series (NaN = missing) -> [N, F] float32 calendar-free features: per band
    and index, PERCENTILES, mean and std of its clear observations (`age_s2` / `age_s1` 0 in
    the pivot; where a pixel has fewer than MIN_CLEAR of them, or the ages are not among the
    channels, its whole gap-filled series). Missing values become `MISSING`."""
    if series.ndim != 3 or series.shape[2] != len(channels):
        raise ValueError(f"series must be [N, T, {len(channels)}], got {series.shape}")
    col = {name: series[:, :, i] for i, name in enumerate(channels)}
    curves: list[tuple[np.ndarray, str]] = [(col[b], "s2") for b in S2_BANDS if b in col]
    curves += [(col[b], "s1") for b in S1_BANDS if b in col]
    curves += [
        (_normalised_difference(col[a], col[b]), "s2")
        for a, b in INDICES.values()
        if {a, b} <= set(col)
    ]
    if {"VV", "VH"} <= set(col):
        curves.append((col["VH"] - col["VV"], "s1"))
    clear = {m: _clear(col.get(f"age_{m}")) for m in ("s2", "s1")}
    parts = [_distribution(curve, clear[modality]) for curve, modality in curves]
    if not parts:
        return np.zeros((series.shape[0], 0), dtype=np.float32)
    features = np.concatenate(parts, axis=1).astype(np.float32)
    return np.where(np.isfinite(features), features, MISSING)


def _clear(age: np.ndarray | None) -> np.ndarray | None:
    """[N, T] True where a value was observed that day; None without ages."""
    if age is None:
        return None
    clear = age == 0
    few = clear.sum(axis=1) < MIN_CLEAR
    clear[few] = True  # too few clear days: the gap-filled series
    return clear


def _distribution(curve: np.ndarray, clear: np.ndarray | None) -> np.ndarray:
    """[N, 7]: PERCENTILES, mean and std of each row's finite values (where `clear`), by one
    sort of the row (NaN sorts last), with numpy's linear interpolation between ranks."""
    values = np.where(clear, curve, np.nan) if clear is not None else curve
    values = np.sort(values, axis=1)
    n = np.isfinite(values).sum(axis=1)
    rows = np.arange(len(values))
    out = []
    for q in PERCENTILES:
        position = np.maximum(n - 1, 0) * (q / 100)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, np.maximum(n - 1, 0))
        frac = position - low
        out.append(values[rows, low] * (1 - frac) + values[rows, high] * frac)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(np.isfinite(values), values, 0.0)
        mean = total.sum(axis=1) / n
        spread = np.where(np.isfinite(values), (values - mean[:, None]) ** 2, 0.0)
        std = np.sqrt(spread.sum(axis=1) / n)
    stats = np.stack([*out, mean, std], axis=1)
    stats[n == 0] = np.nan
    return stats
