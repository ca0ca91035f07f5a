"""What a pixel's year looks like, in numbers and in words (issue 19).

From the network's own input (days × channels, `ModelSpec.channels`) each pixel gets interpretable
descriptors a person would use: NDVI green-up, peak and senescence day and level, bare-soil
periods per season, abrupt NDVI drops (a harvest: one that lasts; mowing), water persistence
(NDWI > 0), snow, radar brightness and seasonality (VV in dB), stability across the year. A
sentence generator turns them into many varied sentences ("green from March, harvested in late
July", "bare in winter", "bright and stable in radar all year"): quantised facts (months,
seasons, levels) and templates with synonyms, so the set of sentences is finite and a seed
makes it reproducible.

These sentences are the text the alignment head is trained on besides the class phrasings
(`text_align.fit_heads`), so that a prompt can combine attributes that no class names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
SEASONS = {"winter": (12, 1, 2), "spring": (3, 4, 5), "summer": (6, 7, 8), "autumn": (9, 10, 11)}
BARE_NDVI, GREEN_NDVI = 0.3, 0.5
DROP_DAYS, DROP_NDVI, MOW_NDVI = 15, 0.25, 0.1
BRIGHT_VV, DARK_VV = -8.0, -17.0  # dB
SNOW_B03 = 0.3  # reflectance


@dataclass(frozen=True)
class Descriptors:
    """Per-pixel descriptors [N] (NaN where a pixel or the period does not tell)."""

    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def subset(self, index: np.ndarray) -> Descriptors:
        return Descriptors({k: v[index] for k, v in self.values.items()})


# --- from the network input to indices ------------------------------------------------------


def _channel(x: np.ndarray, spec, name: str) -> np.ndarray | None:
    """A band back in its own units (NaN where the modality is unknown), or None if absent."""
    names = spec.channels
    if name not in names:
        return None
    values = x[..., names.index(name)] * spec.norm_std.get(name, 1.0) + spec.norm_mean.get(
        name, 0.0
    )
    age = "age_s1" if name in ("VV", "VH") else "age_s2"
    if age in names:
        values = np.where(x[..., names.index(age)] < 1.0, values, np.nan)
    return values.astype(np.float32)


def _ratio(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(a + b) > 1e-6, (a - b) / (a + b), np.nan).astype(np.float32)


def day_of_year(x: np.ndarray) -> np.ndarray:
    """[N, T] day of year (1–366) from the network's sin/cos channels (the last two)."""
    angle = np.arctan2(x[..., -2], x[..., -1]) % (2 * np.pi)
    return np.rint(angle * 365.25 / (2 * np.pi)).astype(np.int64) % 366


def indices(x: np.ndarray, spec) -> dict:
    """NDVI, NDWI, NDSI, B03, VV and VH [N, T] (None where a band is absent) from network inputs
    [N, T, C] and their spec, and the factor that brings reflectances to 0-1."""
    b03, b04, b08, b11 = (_channel(x, spec, b) for b in ("B03", "B04", "B08", "B11"))
    nir = b08[np.isfinite(b08)] if b08 is not None else np.zeros(0)
    return {
        "reflectance_scale": 1e-4 if nir.size and np.median(nir) > 2 else 1.0,  # 0-10000 DN
        "ndvi": _ratio(b08, b04), "ndwi": _ratio(b03, b08), "ndsi": _ratio(b03, b11),
        "green": b03, "vv": _channel(x, spec, "VV"), "vh": _channel(x, spec, "VH"),
    }  # fmt: skip


# --- descriptors ----------------------------------------------------------------------------


def _nan_stat(fn, values: np.ndarray, axis: int = 1) -> np.ndarray:
    ok = np.isfinite(values).any(axis)
    out = np.full(values.shape[0], np.nan, dtype=np.float32)
    if ok.any():
        out[ok] = fn(values[ok], axis=axis)
    return out


def _first(mask: np.ndarray, doy: np.ndarray, last: bool = False) -> np.ndarray:
    """Day of year of the first (or last) True step per pixel, NaN if none."""
    t = mask.shape[1]
    pos = (t - 1 - mask[:, ::-1].argmax(1)) if last else mask.argmax(1)
    out = doy[np.arange(len(mask)), pos].astype(np.float32)
    return np.where(mask.any(1), out, np.nan)


def _season_share(condition: np.ndarray, known: np.ndarray, month: np.ndarray) -> dict:
    """Share of a pixel's known steps in each season where `condition` holds (NaN: none known)."""
    out = {}
    for season, months in SEASONS.items():
        inside = known & np.isin(month, months)
        n = inside.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[season] = np.where(n > 0, (condition & inside).sum(1) / np.maximum(n, 1), np.nan)
    return out


def _drops(ndvi: np.ndarray, doy: np.ndarray, step_days: int) -> tuple[np.ndarray, ...]:
    """Largest lasting NDVI fall, the day it ends, and the number of mowing-size falls.

    A fall is measured from the highest NDVI of the DROP_DAYS before a step, to the highest NDVI
    of the DROP_DAYS from that step on: a harvest (or a cut for hay) leaves the field bare or in
    stubble for weeks, so the fall lasts. A leftover cloud or shadow dips NDVI for one
    acquisition and recovers, so it is not a harvest, nor is a fall in the series' last
    DROP_DAYS, which cannot be told from one. Falls of mowing size (> MOW_NDVI) are counted
    whether they last or not."""
    lag = max(1, DROP_DAYS // max(step_days, 1))
    n, t = ndvi.shape
    known = np.where(np.isfinite(ndvi), ndvi, -np.inf).astype(np.float32)
    before = np.full((n, t), -np.inf, dtype=np.float32)  # the highest NDVI of the DROP_DAYS before
    after = known.copy()  # the highest of the DROP_DAYS from the step on
    for k in range(1, lag + 1):
        before[:, k:] = np.maximum(before[:, k:], known[:, :-k])
        after[:, :-k] = np.maximum(after[:, :-k], known[:, k:])
    after[:, max(t - lag, 0) :] = np.inf  # past the series' end: not confirmed
    with np.errstate(invalid="ignore"):  # -inf - -inf: nothing known, no fall
        drop = np.nan_to_num(before - ndvi, nan=0.0)
        lasting = np.nan_to_num(before - after, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    size = lasting.max(1)
    day = np.where(size > 0, doy[np.arange(n), lasting.argmax(1)], np.nan).astype(np.float32)
    event = drop > MOW_NDVI
    starts = event[:, 1:] & ~event[:, :-1]
    return size, day, (starts.sum(1) + event[:, 0]).astype(np.float32)


def compute(x: np.ndarray, spec) -> Descriptors:
    """Descriptors of network inputs [N, T, C] (`ModelSpec.channels`, normalised as `spec`)."""
    doy = day_of_year(x)
    month = _month(doy)
    idx = indices(x, spec)
    n = len(x)
    nan = np.full(n, np.nan, dtype=np.float32)
    v: dict[str, np.ndarray] = {}
    ndvi = idx["ndvi"]
    if ndvi is not None and np.isfinite(ndvi).any():
        v.update(_vegetation(ndvi, doy, month, spec.step_days))
        v.update(_water_snow(idx, month))
    else:
        for key in ("ndvi_peak", "ndvi_min", "peak_doy", "greenup_doy", "senescence_doy"):
            v[key] = nan
    vv = idx["vv"]
    if vv is not None and np.isfinite(vv).any():
        v.update(_radar(vv, idx["vh"], month))
    else:
        v["vv_mean"], v["vv_seasonality"] = nan, nan
    v["covered_months"] = np.full(n, len(set(month[0].tolist())), dtype=np.float32)
    return Descriptors(v)


def _month(doy: np.ndarray) -> np.ndarray:
    """Month 1–12 of days of year (a non-leap calendar is close enough for descriptions)."""
    ends = np.cumsum([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    return np.searchsorted(ends, np.clip(doy, 1, 365), side="left") + 1


def _vegetation(ndvi: np.ndarray, doy: np.ndarray, month: np.ndarray, step: int) -> dict:
    known = np.isfinite(ndvi)
    peak = _nan_stat(np.nanmax, ndvi)
    low = _nan_stat(lambda a, axis: np.nanpercentile(a, 5, axis=axis), ndvi)
    filled = np.where(known, ndvi, -np.inf)
    peak_at = filled.argmax(1)
    half = low + 0.5 * (peak - low)
    above = known & (ndvi >= half[:, None])
    after_peak = np.arange(ndvi.shape[1])[None] >= peak_at[:, None]
    before_peak = ~after_peak | (np.arange(ndvi.shape[1])[None] == peak_at[:, None])
    drop, drop_day, mowings = _drops(ndvi, doy, step)
    out = {
        "ndvi_peak": peak, "ndvi_min": low, "ndvi_std": _nan_stat(np.nanstd, ndvi),
        "peak_doy": np.where(np.isfinite(peak), doy[np.arange(len(ndvi)), peak_at], np.nan),
        "greenup_doy": _first(above & before_peak, doy),
        "senescence_doy": _first(above & after_peak, doy, last=True),
        "drop": drop, "drop_doy": drop_day, "drops": mowings,
    }  # fmt: skip
    for season, share in _season_share(ndvi < BARE_NDVI, known, month).items():
        out[f"bare_{season}"] = share
    for season, share in _season_share(ndvi > GREEN_NDVI, known, month).items():
        out[f"green_{season}"] = share
    return {k: np.asarray(a, dtype=np.float32) for k, a in out.items()}


def _water_snow(idx: dict, month: np.ndarray) -> dict:
    ndwi, ndsi, green = idx["ndwi"], idx["ndsi"], idx["green"]
    out = {}
    if ndwi is not None:
        known = np.isfinite(ndwi)
        water = known & (ndwi > 0)
        out["water"] = (water.sum(1) / np.maximum(known.sum(1), 1)).astype(np.float32)
        for season, share in _season_share(water, known, month).items():
            out[f"water_{season}"] = share.astype(np.float32)
    if ndsi is not None and green is not None:
        # snow is bright in the visible (B03 > 0.3) and dark in SWIR; water has a high NDSI too
        known = np.isfinite(ndsi)
        snow = known & (ndsi > 0.4) & (np.nan_to_num(green) * idx["reflectance_scale"] > SNOW_B03)
        out["snow"] = (snow.sum(1) / np.maximum(known.sum(1), 1)).astype(np.float32)
    return out


def _radar(vv: np.ndarray, vh: np.ndarray | None, month: np.ndarray) -> dict:
    monthly = np.stack(
        [np.where(month == m, vv, np.nan) for m in range(1, 13)], axis=1
    )  # [N, 12, T]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # months with no radar: NaN, as meant
        per_month = np.nanmean(monthly, axis=2)  # [N, 12]
    out = {
        "vv_mean": _nan_stat(np.nanmean, vv),
        "vv_seasonality": _nan_stat(np.nanmax, per_month) - _nan_stat(np.nanmin, per_month),
    }
    if vh is not None:
        out["vh_mean"] = _nan_stat(np.nanmean, vh)
    return {k: np.asarray(a, dtype=np.float32) for k, a in out.items()}


# --- facts and sentences --------------------------------------------------------------------

PARTS = tuple(f"{p} {m}" for m in MONTHS for p in ("early", "mid", "late"))  # 'early March'
DATED = {"greenup": MONTHS, "peak": MONTHS, "harvest": PARTS, "senescence": MONTHS}
_MONTH_STARTS = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])


def _month_code(doy: np.ndarray) -> np.ndarray:
    """Month index 0-11 of days of year, read from their whole day as `_month` reads it."""
    return _month(np.trunc(np.clip(doy, 1, 365)).astype(np.int64)) - 1


def _part_code(doy: np.ndarray) -> np.ndarray:
    """Index into PARTS of days of year: 3 × month index + 0 early, 1 mid, 2 late (thirds of
    10.5 days). Day 0, the year's turn in the sin/cos day encoding, is early January."""
    day = np.clip(doy, 1, 365)
    month = _month_code(day)
    third = np.minimum(2, np.floor_divide(day - _MONTH_STARTS[month] - 1, 10.5))
    return 3 * month + third.astype(np.int64)


def _dated(held: np.ndarray, doy: np.ndarray, code) -> np.ndarray:
    """`code` of the days where held and known, -1 elsewhere."""
    held = held & np.isfinite(doy)
    return np.where(held, code(np.where(held, doy, 1.0)), -1)


def fact_columns(d: Descriptors) -> dict[tuple[str, ...], np.ndarray]:
    """Every fact a pixel can hold, for all pixels at once and in the order `facts` states them:
    a bool [N] per fact (('bare', 'winter'), ('radar', 'dark'), ...), and per dated kind
    (('greenup',), ('peak',), ('harvest',), ('senescence',)) an int [N] index into its DATED
    arguments, -1 where the pixel does not hold it. A descriptor absent from d is NaN, or the
    value that states nothing (no drop, no water, unstable)."""
    n = len(d)

    def get(key: str, default: float = np.nan) -> np.ndarray:
        v = d.values.get(key)
        return np.full(n, default) if v is None else np.asarray(v, dtype=np.float64)

    peak, low = get("ndvi_peak"), get("ndvi_min")
    wet = get("water", 0) > 0.8  # open water: no soil, no crop, whatever NDVI says
    veg = np.isfinite(peak) & ~wet
    never, ever = veg & (peak < BARE_NDVI), veg & ~(peak < BARE_NDVI) & (low > GREEN_NDVI)
    level, dense = veg & ~never & ~ever, peak > 0.7
    with np.errstate(invalid="ignore"):
        seasonal = veg & (peak - low > 0.25)
    harvest = veg & (get("drop", 0) > DROP_NDVI) & np.isfinite(get("drop_doy"))
    out = {
        ("never_green",): never, ("evergreen",): ever,
        ("peak_level", "dense"): level & dense, ("peak_level", "moderate"): level & ~dense,
        ("greenup",): _dated(seasonal, get("greenup_doy"), _month_code),
        ("peak",): _dated(seasonal, get("peak_doy"), _month_code),
        ("harvest",): _dated(harvest, get("drop_doy"), _part_code),
        ("senescence",): _dated(seasonal & ~harvest, get("senescence_doy"), _month_code),
        ("mown",): veg & (get("drops", 0) >= 2) & (low > 0.35),
    }  # fmt: skip
    for season in SEASONS:
        bare = get(f"bare_{season}", 0) > 0.6
        green = get(f"green_{season}", 0) > 0.8
        out["bare", season] = veg & bare
        out["green_in", season] = veg & ~bare & green & ~(low > GREEN_NDVI)
    out[("stable_optical",)] = veg & (get("ndvi_std", 1) < 0.05)
    out[("water_always",)] = wet
    for season in SEASONS:
        out["flooded", season] = ~wet & (get(f"water_{season}", 0) > 0.5)
    out[("snow",)] = ~wet & (get("snow", 0) > 0.05)
    vv, change = get("vv_mean"), get("vv_seasonality")
    radar = np.isfinite(vv)
    bright, dark = radar & (vv > BRIGHT_VV), radar & (vv < DARK_VV)
    out["radar", "bright"], out["radar", "dark"] = bright, dark
    out["radar", "moderate"] = radar & ~bright & ~dark
    stable = radar & (change < 2.0)
    out["radar_change", "stable"] = stable
    out["radar_change", "seasonal"] = radar & ~stable & (change > 4.0)
    return out


def fact_lists(d: Descriptors) -> list[list[tuple[str, ...]]]:
    """Each pixel's quantised facts, e.g. ('greenup', 'March'), ('harvest', 'late July')."""
    every: list[tuple[str, ...]] = []  # every fact a column states, and its index per pixel
    ids = []
    for key, column in fact_columns(d).items():
        if len(key) == 1 and key[0] in DATED:
            ids.append(np.where(column >= 0, len(every) + column, -1))
            every += [(key[0], a) for a in DATED[key[0]]]
        else:
            ids.append(np.where(column, len(every), -1))
            every.append(key)
    return [[every[j] for j in row if j >= 0] for row in np.stack(ids, axis=1).tolist()]


def facts(d: Descriptors, i: int) -> list[tuple[str, ...]]:
    """Pixel i's quantised facts (`fact_lists` for all pixels at once)."""
    return fact_lists(d.subset(np.array([i])))[0]


TEMPLATES: dict[str, tuple[str, ...]] = {
    "never_green": ("never green", "no vegetation at any time of year", "bare or sealed all year"),
    "evergreen": ("green all year", "vegetated the whole year", "never bare"),
    "peak_level": ("{0} green vegetation at its peak", "a {0} canopy in the growing season"),
    "greenup": ("green from {0}", "greens up in {0}", "vegetation emerges in {0}"),
    "peak": ("greenest in {0}", "peak greenness in {0}", "fully green in {0}"),
    "harvest": ("harvested in {0}", "cut in {0}", "a sudden loss of green cover in {0}"),
    "senescence": ("turns brown in {0}", "vegetation fades in {0}", "leaves fall in {0}"),
    "mown": ("mown several times", "repeatedly cut and regrowing", "grass cut for hay"),
    "bare": ("bare in {0}", "bare soil in {0}", "no crop cover in {0}"),
    "green_in": ("green in {0}", "vegetated in {0}", "plants growing in {0}"),
    "stable_optical": ("unchanging through the year", "looks the same in every season"),
    "water_always": ("open water all year", "permanently under water", "water in every season"),
    "flooded": ("flooded in {0}", "under water in {0}", "wet and waterlogged in {0}"),
    "snow": ("snow-covered in winter", "under snow for part of the year"),
    "radar": ("{0} in radar", "{0} radar backscatter", "{0} radar returns"),
    "radar_change": ("{0} in radar through the year", "radar backscatter {0} across seasons"),
}
_RADAR_WORDS = {
    "bright": ("bright", "strong", "high"), "dark": ("dark", "weak", "very low"),
    "moderate": ("moderate", "medium", "average"), "stable": ("stable", "constant", "steady"),
    "seasonal": ("changing", "varying", "seasonal"), "dense": ("dense", "lush", "thick"),
}  # fmt: skip


def phrase(fact: tuple[str, ...], rng: np.random.Generator) -> str:
    """One wording of a fact, templates and synonyms drawn with `rng`."""
    template = TEMPLATES[fact[0]][rng.integers(len(TEMPLATES[fact[0]]))]
    args = [_RADAR_WORDS[a][rng.integers(3)] if a in _RADAR_WORDS else a for a in fact[1:]]
    return template.format(*args)


def sentences(fs: Sequence[tuple[str, ...]], n: int, rng: np.random.Generator) -> list[str]:
    """n sentences of one, two or three of a pixel's facts, joined as a person would."""
    if not fs:
        return []
    out = []
    for _ in range(n):
        k = int(rng.integers(1, min(3, len(fs)) + 1))
        chosen = sorted(rng.choice(len(fs), size=k, replace=False))
        parts = [phrase(fs[j], rng) for j in chosen]
        text = parts[0] if k == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        out.append(text[0].upper() + text[1:])
    return list(dict.fromkeys(out))


def describe(d: Descriptors, n: int = 6, seed: int = 0) -> list[list[str]]:
    """Up to n sentences per pixel (deterministic given the seed)."""
    rng = np.random.default_rng(seed)
    return [sentences(fs, n, rng) for fs in fact_lists(d)]


def sentence_table(
    per_pixel: Sequence[Sequence[str]], max_sentences: int | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """The distinct sentences, and each pixel's sentence indices into them. With
    `max_sentences`, only the most frequent ones are kept (ties: first seen), which bounds the
    text-encoder's work; a pixel keeps those of its sentences that remain."""
    counts: dict[str, int] = {}
    for ss in per_pixel:
        for text in ss:
            counts[text] = counts.get(text, 0) + 1
    kept = list(counts)
    if max_sentences is not None and len(kept) > max_sentences:
        order = sorted(range(len(kept)), key=lambda i: -counts[kept[i]])  # stable: first seen
        kept = [kept[i] for i in sorted(order[:max_sentences])]
    index = {text: i for i, text in enumerate(kept)}
    ids = [np.array([index[t] for t in ss if t in index], dtype=np.int64) for ss in per_pixel]
    return kept, ids
