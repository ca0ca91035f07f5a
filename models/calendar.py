"""Calendar alignment at prediction time: the region's season found from its own cube.

A model learns the calendar of the region and year it was trained on. Elsewhere, or another
year, the same crops green up and are harvested weeks earlier or later, and a date-aware network
then confuses them (spring cereals a month late look like maize). The pivot cube of the region
being mapped exists before it is mapped, so its calendar can be measured without a label: the
model keeps the season of its training region (`ModelSpec.season`: the mean NDVI of the
training table's unlabelled pixels, drawn at random over the region, at each step), predict computes the same profile on a random sample of
the region's pixels, and the shift that best aligns the two (least squared difference of the
standardised profiles, so a drier year's lower greenness does not count) moves every pixel's
series before it is classified. This is the calendar counterpart of TimeMatch (Nyborg et al.,
2022), which estimates the shift from the model's own certainty instead: on the real Flanders
patch that estimate (certainty with diverse classes) chose shifts of up to +45 days where there
was none and cost 5 points, where the profile finds every simulated shift exactly and 0 in place.

`predict.calendar_shift: auto` (the default) does this; a number of days imposes a shift; 0
maps the series as they are. The shift chosen and the distance at every candidate are kept in
the predict result, and the products say it (their version, `pivotmap:calendar_shift_days`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pivotmap.models.pivot_series import shift_series  # travels with the registered model

__all__ = ["shift_series"]  # re-exported: the calendar's one implementation of the move

KEEP_ZERO = 0.9  # a shift must bring the distance below this share of no shift's to be taken
# and below this: standardised profiles at distance d correlate at 1 - d / 2, so a shift is only
# taken where the seasons, aligned, correlate at 0.5 or more (a short or cloudy period's
# profile that matches no shift well moves nothing)
MAX_DISTANCE = 1.0
MIN_PIXELS = 100  # fewer sampled pixels with data than this: no estimate
MIN_SEASON = 0.03  # NDVI: a profile whose standard deviation is below this has no season


class CalendarError(ValueError):
    """The region's calendar cannot be estimated: the message says why and what to set."""


def unshift(values: np.ndarray, steps: int) -> np.ndarray:
    """[N, T, C] per-step values of a series moved by `shift_series` (attributions, say) put
    back on the steps they came from; a repeated first or last step's values add to it."""
    if steps == 0:
        return values
    n_steps = values.shape[1]
    source = np.clip(np.arange(n_steps) - steps, 0, n_steps - 1)
    out = np.zeros_like(values)
    for moved, own in enumerate(source):
        out[:, own] += values[:, moved]
    return out


@dataclass(frozen=True)
class CalendarShift:
    """The shift predict applies (steps of the model's `step_days`) and how it was found."""

    steps: int
    step_days: int
    method: str  # "auto" (estimated from the cube), "fixed" (configured) or "none"
    distance: dict[int, float]  # of the seasons at each candidate shift in days (auto only)
    pixels: int = 0  # pixels the estimate used
    note: str = ""  # why an estimate moved nothing

    @property
    def days(self) -> int:
        return self.steps * self.step_days

    def summary(self) -> dict:
        return {
            "days": self.days,
            "method": self.method,
            "pixels": self.pixels,
            **({"note": self.note} if self.note else {}),
            "distance_by_shift_days": {str(k): v for k, v in sorted(self.distance.items())},
        }


def season_profile(series: np.ndarray, names: Sequence[str]) -> np.ndarray | None:
    """[T] mean NDVI over the pixels [N, T, C] (raw, NaN = missing; channels `names`) at each
    step, steps without any value filled from their neighbours; None without B04 and B08 or
    without a value at all. The mean, not the median: a median jumps from one class's values
    to another's as their shares change, and regions differ in their class mix."""
    if "B04" not in names or "B08" not in names:
        return None
    red, nir = (series[:, :, list(names).index(b)] for b in ("B04", "B08"))
    with np.errstate(invalid="ignore", divide="ignore"):
        ndvi = (nir - red) / (nir + red)
    ndvi[~np.isfinite(ndvi)] = np.nan
    known = np.isfinite(ndvi).any(0)
    if not known.any():
        return None
    steps = np.arange(ndvi.shape[1])
    mean = np.nanmean(ndvi[:, known], axis=0)
    return np.interp(steps, steps[known], mean)


def _standardised(profile: np.ndarray) -> np.ndarray:
    spread = profile.std()
    return (profile - profile.mean()) / (spread if spread > 0 else 1.0)


def estimate_shift(
    reference: Sequence[float], series: np.ndarray, names: Sequence[str], step_days: int,
    search_days: int,
) -> CalendarShift:  # fmt: skip
    """The shift (whole steps, within ±`search_days`, at most a quarter of the series) that
    best aligns the season of pixels `series` [N, T, C] (raw; channels `names`) with
    `reference` (the model's `ModelSpec.season`). No shift unless one brings the distance
    under KEEP_ZERO of no shift's and under MAX_DISTANCE; among equal distances the smaller
    shift wins.

    Raises:
        CalendarError: no reference, too few pixels with values, or series of another length.
    """
    if len(reference) == 0:
        raise CalendarError(
            "calendar_shift auto: the model records no season (an S1-only model, or one "
            "registered before seasons were kept): set predict.calendar_shift to a number of days"
        )
    if series.shape[1] != len(reference):
        raise CalendarError(
            f"calendar_shift auto: the cube gives {series.shape[1]} steps, the model's season "
            f"{len(reference)}: map a period as long as the training one"
        )
    profile = season_profile(series, names) if len(series) >= MIN_PIXELS else None
    if profile is None:
        raise CalendarError(
            f"calendar_shift auto: {len(series)} sampled pixels with values, {MIN_PIXELS} "
            "needed (with B04 and B08): raise predict.calendar_pixels or set a number of days"
        )
    if profile.std() < MIN_SEASON:
        return CalendarShift(
            steps=0, step_days=step_days, method="auto", pixels=len(series), distance={},
            note=f"the region's mean NDVI varies by {profile.std():.3f} (std) over the period: "
            "no season to align, not moved",
        )  # fmt: skip
    target = _standardised(np.asarray(reference, dtype=np.float64))
    reach = min(search_days // step_days, len(reference) // 4)
    distance = {}
    for steps in range(-reach, reach + 1):
        moved = shift_series(profile[None, :, None], steps)[0, :, 0]
        distance[steps] = round(float(np.mean((_standardised(moved) - target) ** 2)), 5)
    best, note = min(distance, key=lambda s: (distance[s], abs(s))), ""
    if best and distance[best] > MAX_DISTANCE:
        note = (
            f"the region's season matches the model's poorly at every shift (best correlation "
            f"{1 - distance[best] / 2:.2f} at {best * step_days} days): not moved"
        )
        best = 0
    elif distance[best] > KEEP_ZERO * distance[0]:
        best = 0
    return CalendarShift(
        steps=best, step_days=step_days, method="auto", pixels=len(series),
        distance={s * step_days: d for s, d in distance.items()}, note=note,
    )  # fmt: skip


def region_sample(pivot_url: str, spec, pixels: int, seed: int = 0, edge: int = 16) -> np.ndarray:
    """Raw series [n, T, C] (`spec`'s channels, NaN = missing) of the pixels with data in
    random `edge`² windows of the cube at `pivot_url` (about `pixels` of them), sampled every
    `spec.step_days`. Windows, not scattered pixels: each reads one chunk or a few, so the
    sample costs the same on a country's cube as on a district's."""
    from pivotmap.models.features import has_data, raw_series
    from pivotmap.tasks.cube import PivotReader

    reader = PivotReader(pivot_url)
    height, width = reader.sizes["y"], reader.sizes["x"]
    rng = np.random.default_rng(seed)
    names, parts = spec.channels[:-2], []
    for _ in range(max(1, -(-pixels // edge**2))):
        row = int(rng.integers(0, max(1, height - edge + 1)))
        col = int(rng.integers(0, max(1, width - edge + 1)))
        window = reader.window(slice(row, row + edge), slice(col, col + edge), spec.step_days)
        series = raw_series(window, names)
        parts.append(series[has_data(series)])
    return np.concatenate(parts)
