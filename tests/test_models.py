"""Encoders, fusion, pretraining, distillation, baseline and evaluation: small real runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotmap.models.baseline import MISSING, fit_random_forest, temporal_features
from pivotmap.models.datamodule import label_subset
from pivotmap.models.distill import distill, student_spec
from pivotmap.models.encoders import LearnedPooling
from pivotmap.models.evaluation import code_version, confusion_png, metrics
from pivotmap.models.features import fit_normalisation, network_input
from pivotmap.models.network import (
    FusionClassifier,
    ModelSpec,
    TempConvClassifier,
    build_model,
    count_parameters,
    flops_per_pixel,
)
from pivotmap.models.pretrain import mask_spans, pretrain
from pivotmap.models.training import fit, predict_proba

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"s2_channels": ("B04", "B08", "age_s2"), "s1_channels": ("VV", "age_s1"), "hidden": 16}


def _problem(n: int = 240, t: int = 16, seed: int = 0):
    """Three classes told apart by S2 phenology and by S1 level; ages 0 every 3rd step."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    series = np.zeros((n, t, 5), dtype=np.float32)
    phase = np.linspace(0, 2 * np.pi, t)
    series[:, :, 0] = 0.1 + 0.05 * np.cos(phase[None] + y[:, None]) + rng.normal(0, 0.01, (n, t))
    series[:, :, 1] = 0.3 + 0.2 * np.sin(phase[None] + y[:, None]) + rng.normal(0, 0.02, (n, t))
    series[:, :, 2] = np.arange(t)[None] % 3
    series[:, :, 3] = -12 + 3 * y[:, None] + rng.normal(0, 0.5, (n, t))
    series[:, :, 4] = np.arange(t)[None] % 2
    spec = fit_normalisation(series, ModelSpec(classes=(10, 20, 30), n_steps=t, **SMALL))
    return network_input(series, np.arange(t) * 15 + 1, spec), y, spec


def test_default_model_is_compact_and_pools_the_time_axis():
    spec = ModelSpec(classes=(1, 2, 3, 4), hidden=32, n_steps=98)
    model = build_model(spec)
    assert isinstance(model, FusionClassifier) and count_parameters(model) < 1_000_000
    pooled = LearnedPooling(8, 3)(torch.randn(5, 49, 8))
    assert pooled.shape == (5, 3, 8)
    flops = flops_per_pixel(spec)
    assert 1e5 < flops < 1e7
    # twice the days cost less than twice the FLOPs: only the per-patch layers see the time axis
    assert flops_per_pixel(spec, n_steps=196) < 2 * flops
    assert flops_per_pixel(student_spec(spec, 16)) < flops / 3
    x = torch.randn(3, 37, len(spec.channels))  # any number of steps
    assert model.eval()(x).shape == (3, 4)


def test_a_missing_modality_is_ignored_not_guessed():
    x, _, spec = _problem(n=4)
    model = build_model(spec).eval()
    xt = torch.from_numpy(x)
    xt[:, :, 0:2], xt[:, :, 2] = 0.0, 1.0  # no S2 at all: bands 0, age at the cap
    other = xt.clone()
    other[:, :, 0:2] = torch.randn_like(other[:, :, 0:2])  # whatever S2 says, it is not used
    with torch.no_grad():
        assert torch.allclose(model(xt), model(other), atol=1e-5)
        assert model.present(xt).tolist() == [[False, True]] * 4
        assert torch.isfinite(model(torch.zeros_like(xt) + xt * 0)).all()


def test_fusion_learns_and_each_modality_alone_still_predicts():
    x, y, spec = _problem()
    model = fit(x[:180], y[:180], spec, epochs=15, batch_size=64, learning_rate=5e-3, seed=0).model
    codes = np.array(spec.classes)
    scores = metrics(
        codes[y[180:]], codes[predict_proba(model, x[180:], 64).argmax(1)], spec.classes
    )
    assert scores["overall_accuracy"] > 0.9
    s1_only = x[180:].copy()
    s1_only[:, :, 0:2], s1_only[:, :, 2] = 0.0, 1.0
    accuracy = (predict_proba(model, s1_only, 64).argmax(1) == y[180:]).mean()
    assert accuracy > 0.8  # trained with modality dropout: S1 alone separates the classes


def test_single_modality_network_uses_only_its_channels():
    x, y, spec = _problem(n=8)
    s1 = build_model(spec.replace(modalities=("s1",)))
    assert set(s1.encoders) == {"s1"} and count_parameters(s1) < count_parameters(build_model(spec))
    with pytest.raises(ValueError, match="modalities"):
        spec.replace(modalities=("s3",))


def test_specs_saved_before_the_fusion_encoders_still_load():
    raw = ModelSpec(classes=(1, 2), hidden=8).to_dict()
    for key in ("arch", "modalities", "tokens", "layers", "fusion_layers", "heads", "patch"):
        raw.pop(key)
    raw.pop("modality_dropout")
    model = build_model(raw)
    assert isinstance(model, TempConvClassifier)
    assert model(torch.zeros(2, 6, len(model.spec.channels))).shape == (2, 2)


def test_masking_hides_spans_and_scores_only_real_observations():
    x, _, spec = _problem(n=64)
    xt = torch.from_numpy(x)
    masked, score = mask_spans(
        xt, spec, ratio=0.5, span=4, generator=torch.Generator().manual_seed(0)
    )
    hidden_s2 = masked[:, :, 2] == 1.0
    assert 0.3 < hidden_s2.float().mean() < 0.7
    assert (masked[:, :, 0][hidden_s2] == 0).all() and (masked[:, :, 1][hidden_s2] == 0).all()
    assert not score[:, :, 2].any() and not score[:, :, 4].any()  # ages are never targets
    assert (xt[:, :, 2][score[:, :, 0]] == 0).all()  # only observed (age 0) values are scored
    assert score[:, :, 0].any() and score[:, :, 3].any()


def test_pretraining_learns_and_initialises_the_classifier():
    x, y, spec = _problem(n=128)
    state, losses = pretrain(x, spec, epochs=4, batch_size=64, learning_rate=5e-3, seed=0)
    assert losses[-1] < losses[0] and not any(k.startswith("head.") for k in state)
    tuned = fit(
        x[:30], y[:30], spec, epochs=1, batch_size=64, learning_rate=1e-9, seed=1, init_state=state
    )
    key = "encoders.s2.embed.0.weight"
    assert torch.allclose(tuned.model.state_dict()[key], state[key], atol=1e-6)
    with pytest.raises(ValueError, match="shares no weight"):
        fit(
            x[:30],
            y[:30],
            spec,
            epochs=1,
            batch_size=8,
            learning_rate=1e-3,
            seed=0,
            init_state={"x": torch.zeros(1)},
        )


def test_distilled_student_is_smaller_and_close_to_the_teacher():
    x, y, spec = _problem()
    teacher = fit(
        x[:180], y[:180], spec, epochs=15, batch_size=64, learning_rate=5e-3, seed=0
    ).model
    y_pool = np.concatenate([y[:30], np.full(150, -1)])  # mostly unlabelled
    small = student_spec(spec, 8)
    student = distill(
        teacher, x[:180], y_pool, small, epochs=20, batch_size=64, learning_rate=5e-3, seed=0
    ).model
    assert count_parameters(student) < count_parameters(teacher) / 2
    agree = predict_proba(student, x[180:], 64).argmax(1) == predict_proba(
        teacher, x[180:], 64
    ).argmax(1)
    assert agree.mean() > 0.85


def test_random_forest_features_and_baseline():
    rng = np.random.default_rng(0)
    channels = ("B03", "B04", "B08", "B11", "age_s2", "VV", "VH", "age_s1")
    n, t = 300, 20
    y = rng.integers(0, 2, n)
    series = rng.normal(0.2, 0.02, (n, t, len(channels))).astype(np.float32)
    series[:, :, 2] += 0.3 * y[:, None]  # B08: vegetation
    series[:5, :4, :] = np.nan
    features = temporal_features(series, channels, every=2)
    # 6 bands x 10 steps, 4 curves (3 indices + VH-VV) x 10 steps, 4 curves x 7 statistics
    assert features.shape == (n, 60 + 40 + 28) and np.isfinite(features).all()
    assert (features[:5] == MISSING).any()
    forest = fit_random_forest(features[:200], y[:200], trees=30, seed=0)
    assert (forest.predict(features[200:]) == y[200:]).mean() > 0.95
    with pytest.raises(ValueError, match="series must be"):
        temporal_features(series[:, :, :3], channels, every=2)


def test_label_subset_keeps_every_class():
    codes = np.array([1] * 900 + [2] * 100 + [3] * 10)
    idx = label_subset(codes, 0.05, seed=0)
    picked = np.bincount(codes[idx])
    assert picked[1] == 45 and picked[2] == 5 and picked[3] == 2 and len(set(idx)) == len(idx)
    assert len(label_subset(codes, 1.0, seed=0)) == len(codes)


def test_confusion_png_and_code_version(tmp_path):
    scores = metrics(np.array([1, 1, 2, 3]), np.array([1, 2, 2, 3]), (1, 2, 3))
    assert scores["kappa"] > 0.5 and scores["confusion_matrix"][0] == [1, 1, 0]
    path = confusion_png(scores["confusion_matrix"], ["a", "b", "c"], tmp_path / "cm.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = code_version("9.9.9")
    assert version == "9.9.9" or len(version.split("+")[0]) == 40
