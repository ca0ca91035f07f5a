"""Descriptors of a pixel's year and the sentences made from them (issue 19), on synthetic
series whose green-up, peak, harvest, water and radar are known."""

from __future__ import annotations

import numpy as np
import pytest

from pivotmap.models import descriptors
from pivotmap.models.features import network_input
from pivotmap.models.network import ModelSpec

SPEC = ModelSpec(classes=(1, 2, 3))
DOY = np.arange(1, 366, SPEC.step_days)


def _pixel(ndvi: np.ndarray, vv: float, water: bool = False, vv_swing: float = 0.0) -> np.ndarray:
    """A raw [T, C] series: reflectances giving `ndvi`, radar `vv` dB (± a seasonal swing)."""
    names = SPEC.channels[:-2]
    out = np.full((len(DOY), len(names)), 0.1, dtype=np.float32)
    red = np.full(len(DOY), 0.05)
    nir = 0.02 * np.ones(len(DOY)) if water else red * (1 + ndvi) / (1 - ndvi)
    out[:, names.index("B04")], out[:, names.index("B08")] = red, nir
    out[:, names.index("B03")] = 0.06
    out[:, names.index("B11")] = 0.005 if water else 0.2  # water: dark in SWIR, NDSI high
    out[:, names.index("age_s2")] = out[:, names.index("age_s1")] = 0.0
    out[:, names.index("VV")] = vv + vv_swing * np.sin(2 * np.pi * DOY / 365)
    out[:, names.index("VH")] = vv - 6
    return out


def _crop() -> np.ndarray:
    """Winter cereal: bare-ish winter, green-up in March, peak late May, harvested ~15 July."""
    ndvi = np.interp(DOY, [1, 60, 90, 150, 190, 197, 365], [0.2, 0.25, 0.55, 0.85, 0.7, 0.15, 0.2])
    return ndvi


def _cube() -> np.ndarray:
    series = np.stack([
        _pixel(_crop(), -11.0, vv_swing=3.0),  # crop
        _pixel(np.full(len(DOY), 0.1), -20.0, water=True),  # lake
        _pixel(np.full(len(DOY), 0.12), 1.0),  # built-up: bright, stable radar
    ])  # fmt: skip
    return network_input(series, DOY, SPEC)


def test_crop_descriptors_find_its_season_and_harvest():
    d = descriptors.compute(_cube(), SPEC)
    assert 130 <= d["peak_doy"][0] <= 160 and d["ndvi_peak"][0] > 0.8
    assert 60 <= d["greenup_doy"][0] <= 100  # green from March
    assert d["drop"][0] > 0.4 and 185 <= d["drop_doy"][0] <= 205  # harvest in July
    assert d["bare_winter"][0] > 0.9 and d["green_winter"][0] == 0
    assert d["water"][1] == 1 and d["water"][0] == 0
    assert d["vv_mean"][2] > -1 and d["vv_seasonality"][2] < 0.5 and d["vv_seasonality"][0] > 4


def test_sentences_say_what_the_series_shows_and_are_seeded():
    d = descriptors.compute(_cube(), SPEC)
    crop, lake, town = (descriptors.facts(d, i) for i in range(3))
    assert ("harvest", "mid July") in crop and ("greenup", "March") in crop
    assert ("bare", "winter") in crop and ("water_always",) in lake
    assert ("radar", "bright") in town and ("radar_change", "stable") in town
    assert not any(f == ("snow",) for f in lake)  # water has a high NDSI too, but is dark
    texts = descriptors.describe(d, n=12, seed=3)
    assert texts == descriptors.describe(d, n=12, seed=3)  # deterministic
    assert len(set(texts[0])) >= 6  # varied
    joined = " ".join(texts[0]).lower()
    assert "july" in joined and "march" in joined and "winter" in joined
    assert not any("july" in s.lower() for s in texts[2])
    unique, ids = descriptors.sentence_table(texts)
    assert [unique[j] for j in ids[1]] == texts[1]


def test_missing_modality_gives_no_facts_of_it():
    x = _cube()
    x[:, :, SPEC.channels.index("age_s1")] = 1.0  # radar never observed
    d = descriptors.compute(x, SPEC)
    assert np.isnan(d["vv_mean"]).all()
    assert not any(f[0].startswith("radar") for f in descriptors.facts(d, 2))


def test_sentence_table_keeps_the_most_frequent():
    per_pixel = [["a", "b"], ["b", "c"], ["b", "a"], ["d"]]
    texts, ids = descriptors.sentence_table(per_pixel, max_sentences=2)
    assert texts == ["a", "b"]  # b three times, a twice; first-seen order kept
    assert [i.tolist() for i in ids] == [[0, 1], [1], [1, 0], []]


def _random_descriptors(n: int, seed: int, absent: tuple[str, ...] = ()) -> descriptors.Descriptors:
    """n pixels of plausible descriptors: NaNs, open water, whole and fractional days (day 0 too),
    values on the thresholds; the `absent` keys left out."""
    rng = np.random.default_rng(seed)

    def draw(lo, hi, nan=0.1, integer=False, edges=()):
        v = rng.uniform(lo, hi, n)
        v = np.where(rng.random(n) < 0.5, np.round(v), v) if integer else v
        v = np.where(rng.random(n) < 0.05, rng.choice([lo, hi, *edges], n), v)
        return np.where(rng.random(n) < nan, np.nan, v).astype(np.float32)

    day = {"integer": True, "edges": (0.5, 1, 10.5, 11.5, 31, 32, 59, 60, 334, 335, 365)}
    peak = draw(0, 0.95, edges=(0.3, 0.7))
    v = {
        "ndvi_peak": peak, "ndvi_min": (peak - draw(-0.05, 0.7, edges=(0.25,))).astype(np.float32),
        "ndvi_std": draw(0, 0.15, edges=(0.05,)), "peak_doy": draw(0, 366, **day),
        "greenup_doy": draw(-1, 366, **day), "senescence_doy": draw(0, 366, **day),
        "drop": draw(0, 0.6, edges=(0.25,)), "drop_doy": draw(0, 366, **day),
        "drops": draw(0, 4, integer=True),
        "water": np.where(rng.random(n) < 0.15, draw(0.7, 1, edges=(0.8,)), draw(0, 0.2)),
        "snow": draw(0, 0.1, edges=(0.05,)), "vv_mean": draw(-25, 2, edges=(-8, -17)),
        "vv_seasonality": draw(0, 6, edges=(2, 4)),
        **{f"{k}_{s}": draw(0, 1, edges=(0.5, 0.6, 0.8)) for k in ("bare", "green", "water")
           for s in descriptors.SEASONS},
    }  # fmt: skip
    return descriptors.Descriptors({k: a for k, a in v.items() if k not in absent})


def _reference_facts(d: descriptors.Descriptors, i: int) -> list[tuple[str, ...]]:
    """Pixel i's facts as the per-pixel code stated them before they became columns."""

    def ok(value):
        return bool(np.isfinite(value))

    def month(doy):
        return int(descriptors._month(np.array([int(doy)]))[0])

    def part(doy):
        doy = min(max(doy, 1), 365)  # day 0 was 'late January' before the columns (a bug)
        start = int(np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])[month(doy) - 1])
        third = ("early", "mid", "late")[min(2, int((doy - start - 1) // 10.5))]
        return f"{third} {descriptors.MONTHS[month(doy) - 1]}"

    g = {k: float(v[i]) for k, v in d.values.items()}
    vv, change = g.get("vv_mean", np.nan), g.get("vv_seasonality", np.nan)
    radar = []
    if ok(vv):
        radar = [("radar", "bright" if vv > -8 else "dark" if vv < -17 else "moderate")]
        radar += [("radar_change", "stable")] if change < 2 else []
        radar += [("radar_change", "seasonal")] if change > 4 else []
    if g.get("water", 0) > 0.8:
        return [("water_always",), *radar]
    out: list[tuple[str, ...]] = []
    peak, low = g.get("ndvi_peak", np.nan), g.get("ndvi_min", np.nan)
    if ok(peak):
        if peak < 0.3:
            out.append(("never_green",))
        elif low > 0.5:
            out.append(("evergreen",))
        else:
            out.append(("peak_level", "dense" if peak > 0.7 else "moderate"))
        seasonal = peak - low > 0.25
        if seasonal and ok(g["greenup_doy"]):
            out.append(("greenup", descriptors.MONTHS[month(g["greenup_doy"]) - 1]))
        if seasonal and ok(g["peak_doy"]):
            out.append(("peak", descriptors.MONTHS[month(g["peak_doy"]) - 1]))
        if g.get("drop", 0) > 0.25 and ok(g.get("drop_doy", np.nan)):
            out.append(("harvest", part(g["drop_doy"])))
        elif seasonal and ok(g["senescence_doy"]):
            out.append(("senescence", descriptors.MONTHS[month(g["senescence_doy"]) - 1]))
        if g.get("drops", 0) >= 2 and low > 0.35:
            out.append(("mown",))
        for season in descriptors.SEASONS:
            if g.get(f"bare_{season}", 0) > 0.6:
                out.append(("bare", season))
            elif g.get(f"green_{season}", 0) > 0.8 and not low > 0.5:
                out.append(("green_in", season))
        if g.get("ndvi_std", 1) < 0.05:
            out.append(("stable_optical",))
    out += [("flooded", s) for s in descriptors.SEASONS if g.get(f"water_{s}", 0) > 0.5]
    out += [("snow",)] if g.get("snow", 0) > 0.05 else []
    return out + radar


ABSENT = (
    (), ("vv_mean", "vv_seasonality", "water", "snow", "water_spring"),
    ("drop", "drop_doy", "drops", "ndvi_std", "bare_winter", "green_summer", "ndvi_min"),
    ("ndvi_peak", "ndvi_min"),
)  # fmt: skip


@pytest.mark.parametrize("absent", ABSENT)
def test_fact_columns_state_what_the_per_pixel_rules_stated(absent):
    d = _random_descriptors(3000, seed=len(absent), absent=absent)
    assert descriptors.fact_lists(d) == [_reference_facts(d, i) for i in range(len(d))]
    assert descriptors.facts(d, 7) == _reference_facts(d, 7)
    columns = descriptors.fact_columns(d)
    assert all(c.shape == (len(d),) for c in columns.values())


def test_a_harvest_on_the_turn_of_the_year_is_early_january_and_the_last_day_late_december():
    doy = np.array([0.0, 1.0, 12.0, 22.0, 365.0])
    assert [descriptors.PARTS[c] for c in descriptors._part_code(doy)] == [
        "early January", "early January", "mid January", "late January", "late December",
    ]  # fmt: skip


@pytest.mark.slow
def test_alignment_learns_descriptor_sentences_of_the_training_pixels(tmp_path):
    """build_alignment on a real (untrained) network: sentences embedded, learnt and saved."""
    import torch

    from pivotmap.models.network import build_model
    from pivotmap.models.text_align import TextAlignment, build_alignment, embed_texts
    from pivotmap.tasks.nomenclature import Nomenclature

    torch.manual_seed(0)
    nomenclature = Nomenclature.model_validate({"name": "n", "classes": [
        {"code": c, "name": n, "color": "#000000", "description": f"{n}."}
        for c, n in ((1, "Crop"), (2, "Water"), (3, "Town"))
    ]})  # fmt: skip
    names = ["Crop", "Crop.", "Water", "Water.", "Town", "Town."]
    x = np.repeat(_cube(), 20, axis=0)
    y = np.repeat(np.arange(3), 20)
    model = build_model(SPEC).eval()
    alignment = build_alignment(
        model, nomenclature, dict(zip(names, embed_texts(names), strict=True)), x, y, x, y,
        steps=10,
    )  # fmt: skip
    assert alignment.zero_shot["descriptor_sentences"] == len(alignment.sentences) > 5
    assert any("july" in s.lower() for s in alignment.sentences)
    files = alignment.save(tmp_path)
    again = TextAlignment.from_bytes(
        files["text_align"].read_bytes(), files["text_align_meta"].read_text()
    )
    assert again.sentences == alignment.sentences and set(again.sentences) <= set(again.cache)


def test_a_harvest_is_a_fall_that_lasts_not_a_cloud_dip_that_recovers():
    """A leftover cloud drops NDVI for one acquisition; a harvest leaves the field bare for
    weeks. Only the lasting fall is a harvest, and a fall in the series' last days cannot be
    told from a dip, so it is not one either."""
    green = np.interp(DOY, [1, 90, 150, 365], [0.3, 0.6, 0.85, 0.8])
    dipped = green.copy()
    dipped[np.searchsorted(DOY, 200)] = 0.2  # one acquisition under a thin cloud, in July
    late = green.copy()
    late[-2:] = 0.2  # falls in the last 10 days of the series
    series = np.stack([_pixel(s, -11.0) for s in (_crop(), dipped, late)])
    d = descriptors.compute(network_input(series, DOY, SPEC), SPEC)
    harvested = descriptors.fact_columns(d)[("harvest",)] >= 0
    assert harvested.tolist() == [True, False, False]
    assert d["drop"][0] > 0.4 and d["drop"][1] < 0.1 and d["drop"][2] < 0.1
    assert d["drops"][1] >= 1  # the dip still counts as a fall of mowing size
