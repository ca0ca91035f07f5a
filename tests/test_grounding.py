"""Prompts read as descriptor facts, and pixels scored by the facts their own series hold
(issue 19: zero-shot concepts with no class label and no training), on series whose green-up,
harvest, water and radar are known (`test_descriptors`)."""

from __future__ import annotations

import numpy as np
import pytest

from pivotmap.models import concept, descriptors, grounding, lexicon
from pivotmap.models.features import network_input
from pivotmap.models.text_align import embed_texts
from tests.test_descriptors import (
    ABSENT,
    DOY,
    SPEC,
    _cube,
    _pixel,
    _random_descriptors,
    _reference_facts,
)


def test_vocabulary_states_every_fact_with_and_without_its_argument():
    phrases, facts = grounding.vocabulary()
    assert len(phrases) == len(set(phrases)) == len(facts)
    by_phrase = dict(zip(phrases, facts, strict=True))
    assert by_phrase["harvested in mid July"] == ("harvest", "mid July")
    assert by_phrase["harvested"] == ("harvest", grounding.ANY)
    assert by_phrase["bare soil in winter"] == ("bare", "winter")
    assert by_phrase["very low radar backscatter"] == ("radar", "dark")
    assert "radar backscatter" not in by_phrase  # a level needs its word


def test_clauses_split_a_description_where_a_person_would():
    assert grounding.clauses("Maize sown in spring, bare until late May and harvested in October.") == [
        "Maize sown in spring", "bare until late May", "harvested in October",
    ]  # fmt: skip
    assert grounding.clauses("  a lake ") == ["a lake"]
    assert grounding.clauses("...") == ["..."]


def test_months_one_off_count_half_and_other_kinds_nothing():
    pixel = [("harvest", "mid July"), ("radar", "dark")]
    assert grounding.holds(("harvest", "late July"), pixel) == 1.0  # same month, other third
    assert grounding.holds(("harvest", "mid July"), pixel) == 1.0
    assert grounding.holds(("harvest", "early August"), pixel) == 0.5
    assert grounding.holds(("harvest", "September"), pixel) == 0.0
    assert grounding.holds(("harvest", "December"), [("harvest", "early January")]) == 0.5
    assert grounding.holds(("harvest", grounding.ANY), pixel) == 1.0
    assert grounding.holds(("greenup", "July"), pixel) == 0.0
    assert grounding.holds(("radar", "bright"), pixel) == 0.0


def test_a_prompt_is_read_as_the_facts_it_states_and_scores_the_pixels_that_hold_them():
    d = descriptors.compute(_cube(), SPEC)  # crop (harvested mid July), lake, built-up
    crop = grounding.ground("green from March and harvested in July", embed_texts)
    assert crop.share == 1.0 and {p.fact[0] for p in crop.parts} == {"greenup", "harvest"}
    score = grounding.fact_score(d, crop)
    assert score[0] > 0.7 and score[1] == 0 and score[2] == 0
    lake = grounding.ground("open water all year with very low radar backscatter", embed_texts)
    assert grounding.fact_score(d, lake).argmax() == 1
    town = grounding.ground("bright in radar, never green", embed_texts)
    assert grounding.fact_score(d, town).argmax() == 2
    # half the prompt states a fact: the head's probability keeps half the weight
    half = grounding.ground("harvested in July, near a famous monastery", embed_texts)
    assert half.share == 0.5 and len(half.parts) == 1
    blended = grounding.blend(np.full(3, 0.2, np.float32), grounding.fact_score(d, half), half)
    assert blended[0] == pytest.approx(0.6) and blended[1] == pytest.approx(0.1)


def test_a_negated_clause_counts_against_its_fact_unless_the_wording_is_negative_itself():
    d = descriptors.compute(_cube(), SPEC)  # crop (harvested mid July), lake, built-up
    said = grounding.ground("harvested in July", embed_texts)
    unsaid = grounding.ground("not harvested in July", embed_texts)
    assert [p.fact[0] for p in unsaid.parts] == ["harvest"] and unsaid.parts[0].negated
    assert unsaid.to_dict()["facts"][0]["negated"] is True
    assert grounding.fact_score(d, said).tolist() == [1.0, 0.0, 0.0]
    assert grounding.fact_score(d, unsaid).tolist() == [0.0, 1.0, 1.0]  # not a silent "harvested"
    assert grounding.fact_score(d, grounding.ground("without a harvest", embed_texts))[0] == 0
    # "never green" is a fact wording of its own: read as it is, not as "not never green"
    never = grounding.ground("never green", embed_texts)
    assert not never.parts[0].negated and grounding.fact_score(d, never).argmax() == 2
    # a negation carried from "neither" reaches the facts of the clauses it spans
    carried = grounding.ground("neither bright in radar, nor harvested", embed_texts)
    assert [p.negated for p in carried.parts] == [True, True]
    assert "not 'harvested" in concept.grounding_tag(unsaid)


def test_a_prompt_the_series_cannot_show_grounds_nothing_and_leaves_the_head_alone():
    runway = grounding.ground("an airport runway", embed_texts)
    assert runway.share == 0 and not runway.parts and runway.to_dict()["facts"] == []
    d = descriptors.compute(_cube(), SPEC)
    assert not grounding.fact_score(d, runway).any()
    head = np.array([0.1, 0.5, 0.9], np.float32)
    assert np.array_equal(grounding.blend(head, grounding.fact_score(d, runway), runway), head)


def test_zero_shot_ranking_counts_ties_half_and_weights_by_pixels():
    scores = np.array([[1, 0], [1, 1], [0, 1], [0, 0.5]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    r = grounding.ranking(scores, y)
    assert r["per_class"][0] == {"top1": 0.5, "mean_rank": 1.25, "auc": 1.0, "pixels": 2}
    assert r["per_class"][1] == {"top1": 1.0, "mean_rank": 1.0, "auc": 0.625, "pixels": 2}
    assert (r["top1"], r["mean_rank"], r["auc_class_mean"]) == (0.75, 1.125, 0.8125)
    assert r["mean_rank_class_mean"] == 1.125  # two pixels each: the same
    # unequal classes: the pixel-weighted rank leans to the larger, the class mean does not
    r = grounding.ranking(np.array([[1, 0], [0, 1], [0, 1]], np.float32), np.array([0, 0, 1]))
    assert (r["mean_rank"], r["mean_rank_class_mean"]) == (1.333, 1.25)
    assert (r["top1"], r["top1_class_mean"]) == (0.6667, 0.75)
    figures = grounding.zero_shot_figures(scores, y, seed=3)
    assert figures["heldout"] == grounding.ranking(grounding.calibrate(scores), y)
    assert set(figures["null"]) == set(r)


def test_calibration_ranks_a_class_by_how_unusually_well_a_pixel_fits_its_description():
    # description 0 states two facts every pixel half holds, description 1 one fact: in raw
    # scores 0 wins everywhere; within the scene, the pixels that fit 1 best get class 1
    scores = np.array([[0.5, 0.1], [0.5, 0.4], [0.6, 0.2], [0.4, 0.3]], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    assert grounding.ranking(scores, y)["per_class"][1]["top1"] == 0.0
    calibrated = grounding.calibrate(scores)
    assert calibrated[:, 1].tolist() == [0.25, 1.0, 0.5, 0.75]
    assert calibrated[:, 0].tolist() == [0.625, 0.625, 1.0, 0.25]  # ties share their rank
    assert grounding.ranking(calibrated, y)["top1"] == 1.0
    assert (
        grounding.ranking(calibrated, y)["auc_class_mean"]
        == grounding.ranking(scores, y)["auc_class_mean"]
    )  # monotone per column
    # with no information, the null of the protocol sits at chance
    rng = np.random.default_rng(0)
    noise = rng.random((4000, 4)) * np.array([1.0, 0.2, 3.0, 0.5])  # scales differ a lot
    null = grounding.zero_shot_figures(noise, rng.integers(0, 4, 4000), seed=1)["heldout"]
    assert abs(null["mean_rank"] - 2.5) < 0.05 and abs(null["top1"] - 0.25) < 0.03


def test_a_month_the_prompt_does_not_name_is_not_read_into_it():
    every = grounding.ground("harvested every year", embed_texts)
    assert [p.fact for p in every.parts] == [("harvest", grounding.ANY)]
    assert every.parts[0].phrase == "harvested"  # shown as read, without a month
    july = grounding.ground("harvested in July", embed_texts)
    assert july.parts[0].fact[0] == "harvest" and july.parts[0].fact[1].endswith("July")
    assert grounding.ground("very low radar backscatter", embed_texts).parts[0].fact == (
        "radar", "dark",
    )  # fmt: skip


def test_before_until_and_after_a_month_bound_a_dated_fact():
    before = grounding.ground("harvested before August", embed_texts)
    assert before.parts[0].fact == ("harvest", "<8") and before.parts[0].phrase == (
        "harvested before August"
    )  # fmt: skip
    assert grounding.holds(("harvest", "<8"), [("harvest", "late July")]) == 1.0
    assert grounding.holds(("harvest", "<8"), [("harvest", "early August")]) == 0.0
    assert grounding.holds(("harvest", "<8"), [("greenup", "March")]) == 0.0
    until = grounding.ground("green until late May", embed_texts)
    assert until.parts and until.parts[0].fact[1] == "<6"  # May itself included
    after = grounding.ground("harvested after September", embed_texts)
    assert after.parts[0].fact == ("harvest", ">9")
    assert grounding.holds(("harvest", ">9"), [("harvest", "mid October")]) == 1.0
    assert grounding.holds(("harvest", ">9"), [("harvest", "mid September")]) == 0.0
    d = descriptors.compute(_cube(), SPEC)  # the crop is harvested in mid July
    assert grounding.fact_score(d, before)[0] == 1 and grounding.fact_score(d, after)[0] == 0


def _reference_score(pixels: list, g: grounding.Grounding) -> np.ndarray:
    """`fact_score` pixel by pixel over each pixel's list of facts: the weighted mean of the
    stated facts and of the best-fitting named land cover (one minus it, under a negation)."""
    out = []
    for own in pixels:
        terms, weights, fits = [], [], {}
        for p in g.parts:
            if p.via is None:
                terms.append(abs(p.negated - grounding.holds(p.fact, own)))
                weights.append(p.strength)
            else:
                held, total = fits.get((p.negated, p.via), (0.0, 0.0))
                fits[(p.negated, p.via)] = (
                    held + p.strength * grounding.holds(p.fact, own),
                    total + p.strength,
                )
        for negated in (False, True):
            best = [h / t for (sign, _), (h, t) in fits.items() if sign == negated]
            if best:
                terms.append(1.0 - max(best) if negated else max(best))
                weights.append(1.0)
        out.append(np.dot(terms, weights) / sum(weights))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("absent", ABSENT)
def test_fact_columns_score_as_the_per_pixel_facts_did(absent):
    d = _random_descriptors(3000, seed=len(absent), absent=absent)
    pixels = [_reference_facts(d, i) for i in range(len(d))]
    columns = grounding.pixel_facts(d)
    rng = np.random.default_rng(0)

    def read(*facts):
        parts = [grounding.Part(str(f), str(f), f, float(rng.uniform(0.6, 1))) for f in facts]
        return grounding.Grounding("", len(parts), tuple(parts))

    bounds = [(k, f"{b}{m}") for k in grounding._DATED for b in "<>" for m in (1, 3, 8, 12, 13)]
    single = [read(f) for f in {*grounding.vocabulary()[1], *bounds}]
    prompts = [
        read(("greenup", "March"), ("harvest", "mid July"), ("bare", "winter")),
        read(("harvest", "<8"), ("greenup", ">2"), ("senescence", "<13"), ("radar", "dark")),
        read(("harvest", grounding.ANY), ("peak", "June"), ("water_always",), ("snow",)),
        read(("senescence", "December"), ("harvest", "early January"), ("peak", ">12")),
        read(("peak_level", "dense"), ("green_in", grounding.ANY), ("flooded", "spring"),
             ("mown",), ("radar_change", "seasonal"), ("stable_optical",)),
    ]  # fmt: skip
    for g in single + prompts:
        want = _reference_score(pixels, g)
        assert np.allclose(grounding.fact_score(d, g, columns), want, atol=1e-6), g.parts
    want = _reference_score(pixels, prompts[0])
    assert np.allclose(grounding.fact_score(d, prompts[0]), want, atol=1e-6)


def test_grounded_prompts_score_as_the_per_pixel_facts_did():
    d = _random_descriptors(2000, seed=5)
    pixels = [_reference_facts(d, i) for i in range(len(d))]
    for prompt in (
        "green from March, harvested before August",
        "bare until late May and harvested after September",
        "open water all year with very low radar backscatter",
        "neither cropland nor grassland, such as trees and hedges",
    ):
        g = grounding.ground(prompt, embed_texts)
        assert g.parts
        assert np.allclose(grounding.fact_score(d, g), _reference_score(pixels, g), atol=1e-6)


def test_the_lexicon_states_every_fact_in_the_descriptors_own_words():
    phrases, _ = grounding.vocabulary()
    for entry in lexicon.ENTRIES:
        assert entry.facts and set(entry.facts) <= set(phrases), entry.name
    words = [w for e in lexicon.ENTRIES for w in e.words]
    assert len(words) == len(set(words))  # one entry per word


def test_sealed_ground_and_houses_with_gardens_are_told_apart():
    """At 10 m a sealed pixel is bare in every season though its yearly NDVI peak is not below
    "never green"'s 0.3, and a village pixel mixes roofs and gardens: a moderate canopy with the
    walls' bright, steady radar. Sealed words rank the sealed pixel above the village, garden
    words fit the village fully, and neither fits grass."""
    sealed = np.full(len(DOY), 0.12)
    sealed[::9] = 0.45  # a verge or a leftover cloud now and then: "never green" fails
    village = np.interp(DOY, [1, 90, 160, 250, 365], [0.35, 0.45, 0.6, 0.5, 0.35])
    grass = np.interp(DOY, [1, 120, 160, 175, 240, 365], [0.6, 0.8, 0.85, 0.5, 0.8, 0.65])
    x = network_input(
        np.stack([_pixel(sealed, -3.0), _pixel(village, -5.0), _pixel(grass, -11.0, vv_swing=3)]),
        DOY, SPEC,
    )  # fmt: skip
    d = descriptors.compute(x, SPEC)
    assert not grounding.pixel_facts(d)[("never_green",)].any()

    def scores(prompt: str) -> np.ndarray:
        return grounding.fact_score(d, grounding.ground(prompt, embed_texts))

    concrete, gardens = scores("concrete and asphalt"), scores("houses with gardens in a village")
    assert concrete.tolist() == [1.0, pytest.approx(1 / 3), 0.0]  # bright and stable only
    assert gardens.tolist() == [1.0, 1.0, 0.0]  # "houses" fits the sealed pixel: alternatives
    # the verges lift the sealed pixel's peak into "moderate", as gardens do: only the sealed
    # entry's bare seasons tell the two apart
    assert scores("a suburb with gardens").tolist() == [1.0, 1.0, 0.0]
    assert scores("grassland").argmax() == 2


def test_land_cover_words_are_found_whole_in_plural_and_under_negation():
    said = lambda text, carried=False: [  # noqa: E731
        (m.entry.name, m.negated) for m in lexicon.mentions(text, carried)
    ]
    assert said("Buildings, roads, farmyards and other sealed surfaces") == [
        ("sealed surfaces", False)
    ]  # one entry, once
    assert said("potatoes and vegetables") == [("arable land", False)]
    assert said("a meadow grazed by cattle") == [("grassland", False)]
    assert said("Other non-cropland") == [("arable land", True)]
    assert said("not a forest but a lake") == [("woodland", True), ("open water", True)]
    assert said("grassy verges, watery") == []  # whole words only
    assert said("grassland nor built-up", carried=True) == [
        ("grassland", True), ("sealed surfaces", True),
    ]  # fmt: skip
    assert lexicon.negation_carries("Land that is neither cropland")
    assert not lexicon.negation_carries("neither cropland nor grassland")
    assert lexicon.negation_carries("normally wet", carried=True)  # "nor" as a word only
    assert not lexicon.negation_carries("grassland nor built-up", carried=True)
    assert not lexicon.negation_carries("such as trees")


def test_a_class_described_by_what_it_is_grounds_through_the_lexicon():
    d = descriptors.compute(_cube(), SPEC)  # crop, lake, built-up
    lake = grounding.ground("a lake", embed_texts)
    assert lake.share == 1.0 and {p.via for p in lake.parts} == {"lake"}
    assert {p.fact for p in lake.parts} == {("water_always",), ("radar", "dark")}
    assert grounding.fact_score(d, lake).tolist() == [0.0, 1.0, 0.0]
    town = grounding.ground("Buildings, roads, farmyards and other sealed surfaces", embed_texts)
    assert town.share == 1.0 and len(town.parts) == len(lexicon.SEALED)  # the entry's facts once
    assert sum(p.strength for p in town.parts) == pytest.approx(1.0)
    assert grounding.fact_score(d, town).argmax() == 2
    crops = grounding.ground("maize, cereals and potatoes", embed_texts)
    assert grounding.fact_score(d, crops).argmax() == 0
    rest = grounding.ground("Land that is neither cropland, water nor built-up", embed_texts)
    assert all(p.negated for p in rest.parts) and rest.share == 1.0
    dry = grounding.ground("anything but not water", embed_texts)
    assert grounding.fact_score(d, dry).tolist() == [1.0, 0.0, 1.0]
    assert not grounding.fact_score(d, rest).any()  # each pixel is one of the three it rules out
    wet = grounding.ground("neither cropland nor built-up", embed_texts)
    assert grounding.fact_score(d, wet).argmax() == 1  # the lake is the one left
    # listed land covers are alternatives: the lake fits "trees or water" as well as "water"
    either = grounding.fact_score(d, grounding.ground("trees or water", embed_texts))
    assert (
        either[1] == 1.0
        and either.tolist()
        == np.maximum(
            grounding.fact_score(d, grounding.ground("trees", embed_texts)),
            grounding.fact_score(d, grounding.ground("a lake", embed_texts)),
        ).tolist()
    )
    # and under a negation, a NOR: the lake is water, so it is not "neither trees nor water"
    neither = grounding.fact_score(d, grounding.ground("neither trees nor water", embed_texts))
    assert neither.tolist() == (1.0 - either).tolist()
    said = grounding.sensor_text(town)
    assert said == (
        "bare in winter, bare in spring, bare in summer, bare in autumn, bright in radar, "
        "stable in radar through the year"
    )
    assert grounding.sensor_text(rest) == ""  # only what it is not
