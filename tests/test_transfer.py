"""Models for another place and year (issue 15): calendar-free baseline features, the baseline
the config chooses, and the calendar augmentation of training batches."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pivotmap.config import TrainConfig
from pivotmap.models.baseline import MISSING, percentile_features, temporal_features
from pivotmap.models.datamodule import Augment, Table, augmentation, prepare_data
from pivotmap.models.network import ModelSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHANNELS = ("B04", "B08", "age_s2", "VV", "VH", "age_s1")
T = 40  # steps of 5 days


def _series(
    n: int, rng: np.random.Generator, shift_steps: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """[n, T, 6] raw series of two classes whose NIR peak differs in height (not in date);
    every third S2 step observed (age 0), the others gap-filled; `shift_steps` moves the
    season later."""
    y = np.arange(n) % 2
    t = np.arange(T)[None, :] - shift_steps
    bump = np.exp(-(((t - 20) / 6.0) ** 2))
    series = np.zeros((n, T, len(CHANNELS)), dtype=np.float32)
    series[:, :, 0] = 0.08 - 0.04 * bump + rng.normal(0, 0.005, (n, T))
    series[:, :, 1] = 0.2 + (0.2 + 0.2 * y[:, None]) * bump + rng.normal(0, 0.01, (n, T))
    series[:, :, 2] = np.where(np.arange(T) % 3 == 0, 0, 5)[None, :]
    series[:, :, 3] = -12 + 2 * bump + rng.normal(0, 0.5, (n, T))
    series[:, :, 4] = -18 + 3 * bump + rng.normal(0, 0.5, (n, T))
    series[:, :, 5] = 0
    return series, y


def test_percentile_features_use_the_clear_observations_only():
    series, _ = _series(6, np.random.default_rng(0))
    series[:, 1::3, 1] = 5.0  # absurd gap-filled NIR values: never seen by the features
    features = percentile_features(series, CHANNELS)
    # per band (B04, B08, VV, VH) and index (NDVI, NDWI needs B03: absent; VH-VV): 7 values
    assert features.shape == (6, 6 * 7) and features.dtype == np.float32
    nir_clear = series[:, ::3, 1]
    expected = np.percentile(nir_clear, [10, 25, 50, 75, 90], axis=1).T
    assert np.allclose(features[:, 7:12], expected, atol=1e-6)
    assert np.allclose(features[:, 12], nir_clear.mean(1), atol=1e-6)
    assert np.allclose(features[:, 13], nir_clear.std(1), atol=1e-6)
    # a pixel never seen clear falls back on its gap-filled series; one with no value at all
    # gets MISSING
    series[0, :, 2] = 7
    series[1, :, :3] = np.nan
    features = percentile_features(series, CHANNELS)
    assert np.isclose(features[0, 12], series[0, :, 1].mean(), atol=1e-5)
    assert np.all(features[1, :14] == MISSING) and np.all(features[1, 14:28] != MISSING)
    with pytest.raises(ValueError, match="series must be"):
        percentile_features(series[:, :, :3], CHANNELS)


def test_a_later_season_moves_the_percentiles_little_and_the_dates_much():
    """The same pixels 30 days later: how far their features move, relative to the gap
    between the two classes (each feature in units of its spread)."""
    a, y = _series(200, np.random.default_rng(1))
    b, _ = _series(200, np.random.default_rng(1), shift_steps=6)
    moved = {}
    for name, features in (
        ("percentiles", lambda s: percentile_features(s, CHANNELS)),
        ("temporal", lambda s: temporal_features(s, CHANNELS, 1)),
    ):
        fa, fb = features(a), features(b)
        spread = fa.std(0) + 1e-6
        change = np.linalg.norm((fa - fb) / spread, axis=1).mean()
        gap = np.linalg.norm((fa[y == 1].mean(0) - fa[y == 0].mean(0)) / spread)
        moved[name] = change / gap
    assert moved["percentiles"] < 1.5 and moved["temporal"] > 3 * moved["percentiles"], moved


def _table(n: int = 400) -> Table:
    """A training table of the toy series with every channel of the default model spec (the
    other S2 bands copy red or NIR)."""
    from pivotmap.models.network import S2_BANDS

    series, y = _series(n, np.random.default_rng(2))
    source = {"age_s2": 2, "VV": 3, "VH": 4, "age_s1": 5}
    source |= {b: (0 if b in ("B02", "B03", "B04") else 1) for b in S2_BANDS}
    channels = (*S2_BANDS, "age_s2", "VV", "VH", "age_s1")
    scales = {c: (1.0 if c.startswith("age") or c in ("VV", "VH") else 1e-4) for c in channels}
    codes = np.stack([np.round(series[:, :, source[c]] / scales[c]) for c in channels], axis=2)
    split = np.where(np.arange(n) < n * 3 // 4, "train", "test")
    return Table(
        series=codes.astype(np.int16), doy=np.tile(np.arange(T) * 5 + 1, (n, 1)),
        codes=y + 1, split=split, channels=channels, scales=scales, fill=-32768,
    )  # fmt: skip


def _spec_kwargs() -> dict:
    return {"s2_channels": ("B04", "B08", "age_s2"), "s1_channels": ("VV", "VH", "age_s1")}


@pytest.mark.parametrize(
    ("features", "model", "n_features"),
    [("percentiles", "random_forest", 16 * 7), ("temporal", "gradient_boosting", 348)],
)
def test_the_config_chooses_the_baseline(features, model, n_features):
    from pivotmap.models.trainer import random_forest_baseline

    tc = TrainConfig(baseline_trees=15, baseline_features=features, baseline_model=model)
    data = prepare_data(SimpleNamespace(train=tc), _table(200))
    scores = random_forest_baseline(data, tc)
    assert scores["features"] == n_features
    assert scores["overall_accuracy"] > 0.9
    assert features in scores["model"]
    assert ("HistGradientBoosting" in scores["model"]) == (model == "gradient_boosting")


def _inputs(n: int = 5) -> tuple[np.ndarray, ModelSpec]:
    spec = ModelSpec(classes=(1, 2), step_days=5, **_spec_kwargs())
    x = np.zeros((n, T, len(spec.channels)), dtype=np.float32)
    x[:, :, :-2] = np.arange(T, dtype=np.float32)[None, :, None]  # value = step index
    x[:, :, 2] = x[:, :, 5] = 0.0  # ages: observed
    x[:, :, -2], x[:, :, -1] = np.sin(np.arange(T)), np.cos(np.arange(T))
    return x, spec


def test_augmentation_is_off_by_default_and_built_from_the_config():
    _, spec = _inputs()
    assert augmentation(TrainConfig(), spec) is None
    augment = augmentation(TrainConfig(augment_shift_days=30, augment_dropout=0.2), spec)
    assert augment == Augment(shift_steps=6.0, stretch=0.0, dropout=0.2, s2_width=3, s1_width=3)


def test_shift_moves_the_season_and_keeps_the_dates():
    x, spec = _inputs(200)
    augment = augmentation(TrainConfig(augment_shift_days=30), spec)
    assert augment is not None
    out = augment(x, np.random.default_rng(0))
    middle = out[:, T // 2, 0] - T // 2  # how far each pixel's season moved, in steps
    assert np.all(np.abs(middle) <= 6) and middle.min() <= -5 and middle.max() >= 5
    assert np.all(out[:, :, 0] == out[:, :, 3])  # both modalities move together
    assert np.array_equal(out[:, :, -2:], x[:, :, -2:])  # the day of year stays
    assert np.array_equal(augment(x, np.random.default_rng(0)), out)  # seeded
    assert np.array_equal(x[:, :, 0], np.tile(np.arange(T), (200, 1)))  # input untouched


def test_dropout_marks_dates_as_never_observed():
    x, spec = _inputs(100)
    augment = augmentation(TrainConfig(augment_dropout=0.3), spec)
    assert augment is not None
    out = augment(x, np.random.default_rng(1))
    dropped = out[:, :, 2] == 1.0
    assert 0.2 < dropped.mean() < 0.4
    assert np.all(out[:, :, :2][dropped] == 0) and np.all(
        out[:, :, :2][~dropped] == x[:, :, :2][~dropped]
    )
    assert not np.array_equal(dropped, out[:, :, 5] == 1.0)  # S1 drops its own dates


def test_training_with_augmentation_is_seeded():
    import torch

    from pivotmap.models.training import fit

    x, spec = _inputs(64)
    x = x + np.random.default_rng(3).normal(0, 0.1, x.shape).astype(np.float32)
    y = np.arange(64) % 2
    augment = Augment(shift_steps=3, stretch=0.1, dropout=0.2, s2_width=3, s1_width=3)
    spec = spec.replace(hidden=8)
    runs = [
        fit(x, y, spec, epochs=2, batch_size=16, learning_rate=1e-3, seed=5, augment=augment)
        for _ in range(2)
    ]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_macro_f1_averages_the_classes_present_and_reports_the_absent_ones():
    from pivotmap.models.evaluation import metrics

    truth = np.array([1, 1, 2, 2])
    scores = metrics(truth, np.array([1, 1, 2, 3]), (1, 2, 3))
    assert scores["classes_absent"] == [3] and scores["predicted_absent"] == {"3": 1}
    assert scores["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # not divided by 3 classes
    assert scores["per_class_f1"]["3"] == 0.0
    every = metrics(truth, truth, (1, 2))
    assert (
        every["macro_f1"] == 1.0 and every["classes_absent"] == [] and not every["predicted_absent"]
    )


def test_holdout_of_a_whole_run_tests_on_all_of_it_and_trains_on_the_others(tmp_path):
    from dataclasses import replace

    from pydantic import ValidationError

    table = _table(400)
    source = (np.arange(400) >= 300).astype(np.int16)  # rows 300..399: the included run's
    table = replace(table, source=source)
    other = str(tmp_path / "other-year")
    tc = TrainConfig(include=(other,), holdout=other, max_unlabelled_pixels=1000)
    assert (
        tc.holdout_table() == 1
        and TrainConfig(include=(other,), holdout="self").holdout_table() == 0
    )
    data = prepare_data(SimpleNamespace(train=tc), table)
    assert set(np.flatnonzero(data.is_test)) == set(range(300, 400))  # train and test rows alike
    trained = set(data.train_idx.tolist())
    assert trained == {i for i in range(300) if table.split[i] == "train"}  # blocks of run 0 unused
    blocks = prepare_data(SimpleNamespace(train=TrainConfig()), table)
    assert set(np.flatnonzero(blocks.is_test)) == set(np.flatnonzero(table.split == "test"))
    with pytest.raises(ValidationError, match="train.include"):
        TrainConfig(holdout="self")
    with pytest.raises(ValidationError, match="neither `self` nor one of train.include"):
        TrainConfig(include=(other,), holdout=str(tmp_path / "elsewhere"))


# ---------------------------------------------------------------------------- calendar shift
def _dated(n: int, rng: np.random.Generator, shift_steps: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, T, 6] raw series of three classes told apart by *when* their NIR peaks (steps 8, 18
    and 28, ±1, same height and width: a date-aware model's problem); `shift_steps` moves the
    season later."""
    y = np.arange(n) % 3
    peak = np.array([8, 18, 28])[y] + rng.integers(-1, 2, n)
    t = np.arange(T)[None, :] - shift_steps - peak[:, None]
    bump = np.exp(-((t / 4.0) ** 2))
    series = np.zeros((n, T, len(CHANNELS)), dtype=np.float32)
    series[:, :, 0] = 0.08 - 0.04 * bump + rng.normal(0, 0.005, (n, T))
    series[:, :, 1] = 0.2 + 0.3 * bump + rng.normal(0, 0.01, (n, T))
    series[:, :, 2] = np.where(np.arange(T) % 3 == 0, 0, 5)[None, :]
    series[:, :, 3] = -12 + 2 * bump + rng.normal(0, 0.5, (n, T))
    series[:, :, 4] = -18 + 3 * bump + rng.normal(0, 0.5, (n, T))
    series[:, :, 5] = 0
    return series, y


def test_shift_series_moves_the_steps_and_repeats_the_edge():
    from pivotmap.models.calendar import shift_series

    series = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    later, earlier = shift_series(series, 2), shift_series(series, -2)
    assert later[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3]
    assert earlier[1, :, 0].tolist() == [8, 9, 10, 11, 11, 11]
    assert shift_series(series, 0) is series
    with pytest.raises(ValueError, match="does not fit"):
        shift_series(series, 6)


def test_attributions_of_a_moved_series_go_back_to_the_region_s_own_dates():
    """Explanations of a shifted classification: what the network credited at a moved step is
    credited to the step the value came from (the repeated edge to the edge), nothing lost."""
    from pivotmap.models.calendar import shift_series, unshift

    series = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    for steps in (2, -2):
        moved = shift_series(series, steps)
        # credit every moved step with the value it holds: back home, each own step is credited
        # with its value times the number of moved steps holding it
        back = unshift(moved, steps)
        copies = np.array([(moved[0, :, 0] == v).sum() for v in series[0, :, 0]])
        assert back[0, :, 0].tolist() == (series[0, :, 0] * copies).tolist()
        assert back.sum() == pytest.approx(moved.sum())
    attr = np.zeros((1, 6, 1), np.float32)
    attr[0, 4] = 1.0  # the network looked at moved step 4: the region's step 2 (shift 2)
    assert unshift(attr, 2)[0, :, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert unshift(attr, 0) is attr


def test_the_calendar_shift_of_a_later_region_is_found_without_labels():
    """A network trained where the classes peak at steps 8/18/28 is given a region whose season
    is 5 steps (25 days) later: classified as it is, it confuses the classes. The region's
    season (median NDVI per step), aligned with the one the model keeps from training, gives
    the shift back without a label, and moved by it the region is classified again. Where the
    season is the training one, no shift is found."""
    from pivotmap.models.calendar import CalendarError, estimate_shift, season_profile, shift_series
    from pivotmap.models.features import fit_normalisation, network_input
    from pivotmap.models.training import fit, predict_proba

    rng = np.random.default_rng(0)
    doy = np.arange(T) * 5 + 1
    train, y = _dated(400, rng)
    spec = fit_normalisation(train, ModelSpec(classes=(0, 1, 2), hidden=16, **_spec_kwargs()))
    season = tuple(season_profile(train, CHANNELS))
    spec = spec.replace(n_steps=T, season=season)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # kept as JSON
    model = fit(
        network_input(train, doy, spec), y, spec, epochs=8, batch_size=32,
        learning_rate=3e-3, seed=0,
    ).model  # fmt: skip

    def accuracy(series: np.ndarray, truth: np.ndarray) -> float:
        proba = predict_proba(model, network_input(series, doy, spec), 512, "cpu")
        return float((proba.argmax(1) == truth).mean())

    here, y_here = _dated(300, rng)
    later, y_later = _dated(300, rng, shift_steps=5)
    later[::7, :, 1] = np.nan  # some pixels without NIR: their NDVI is unknown
    later[:, 10] = np.nan  # a step with no value anywhere
    assert accuracy(here, y_here) > 0.95
    assert accuracy(later, y_later) < 0.8  # the calendar it learnt is off by 25 days

    found = estimate_shift(season, later, CHANNELS, 5, search_days=40)
    assert (found.steps, found.days, found.method, found.pixels) == (-5, -25, "auto", 300)
    assert set(found.distance) == {5 * s for s in range(-8, 9)}
    assert found.distance[-25] == min(found.distance.values()) < found.distance[0]
    assert accuracy(shift_series(later, found.steps), y_later) > 0.95
    assert estimate_shift(season, here, CHANNELS, 5, search_days=40).steps == 0  # none to undo
    drier = here.copy()
    drier[:, :, 1] = 0.2 + (drier[:, :, 1] - 0.2) * 0.5  # half the greenness, same calendar
    assert estimate_shift(season, drier, CHANNELS, 5, search_days=40).steps == 0

    noise = rng.uniform(0.05, 0.6, (2000, T, 6)).astype(np.float32)  # no season at all
    flat = estimate_shift(season, noise, CHANNELS, 5, search_days=40)
    assert flat.steps == 0 and "no season to align" in flat.note
    ndvi = np.mean(season) - 3 * (np.asarray(season) - np.mean(season))  # green when it is bare
    other = here.copy()
    other[:, :, 0], other[:, :, 1] = 0.1, 0.1 * (1 + ndvi) / (1 - ndvi)
    unlike = estimate_shift(season, other, CHANNELS, 5, search_days=40)
    assert unlike.steps == 0 and "matches the model's poorly" in unlike.note, unlike
    with pytest.raises(CalendarError, match="records no season"):
        estimate_shift((), later, CHANNELS, 5, 40)
    with pytest.raises(CalendarError, match="gives 20 steps, the model's season 40"):
        estimate_shift(season, later[:, :20], CHANNELS, 5, 40)
    with pytest.raises(CalendarError, match="50 sampled pixels"):
        estimate_shift(season, later[:50], CHANNELS, 5, 40)


def test_the_summary_token_sees_what_the_percentile_baseline_sees():
    """`SummaryToken`'s statistics, before its MLP, are `percentile_features` of the same
    pixels (bands given back from the network's normalised input; a pixel with nothing
    known gives zeros), and a network with it exports."""
    import torch

    from pivotmap.models.encoders import SummaryToken
    from pivotmap.models.features import fit_normalisation, network_input
    from pivotmap.models.network import build_model

    rng = np.random.default_rng(1)
    series, _ = _series(12, rng)
    series[3, :, :3] = np.nan  # no S2 at all
    spec = fit_normalisation(series, ModelSpec(classes=(0, 1), hidden=8, **_spec_kwargs()))
    spec = spec.replace(n_steps=T, summary=True)
    x = torch.from_numpy(network_input(series, np.arange(T) * 5 + 1, spec))
    token = SummaryToken(CHANNELS[3:], spec.norm_mean, spec.norm_std, 8)
    seen: dict = {}
    token.mlp[0].register_forward_hook(lambda _m, inputs, _o: seen.update(stats=inputs[0]))
    token(x[:, :, 3:6])
    stats = seen["stats"][:, 0].numpy().reshape(12, 7, 3)  # [N, statistic, VV / VH / ratio]
    curves = percentile_features(series, CHANNELS).reshape(12, 6, 7)  # B04 B08 VV VH NDVI ratio
    expected = curves[:, [2, 3, 5]]
    for k, name in enumerate(("VV", "VH")):
        m, s = spec.norm_mean[name], spec.norm_std[name]
        values = np.concatenate([stats[:, :6, k] * s + m, stats[:, 6:, k] * s], axis=1)
        assert np.allclose(values, expected[:, k], atol=1e-4)
    assert np.allclose(stats[:, :, 2] * 10, expected[:, 2], atol=1e-4)  # VH - VV in dB, / 10
    s2 = SummaryToken(CHANNELS[:3], spec.norm_mean, spec.norm_std, 8)
    s2.mlp[0].register_forward_hook(lambda _m, inputs, _o: seen.update(stats=inputs[0]))
    s2(x[:, :, :3])
    assert torch.all(seen["stats"][3] == 0)  # nothing known: zeros, not NaN
    model = build_model(spec).eval()
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    assert torch.allclose(program.module()(x[:5]), model(x[:5]), atol=1e-5)
