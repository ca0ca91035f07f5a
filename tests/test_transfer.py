"""Models for another place and year (issue 15): calendar-free baseline features, the baseline
the config chooses, and the calendar augmentation of training batches."""

from __future__ import annotations

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
