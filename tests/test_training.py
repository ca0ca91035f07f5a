"""Features and a short real training run on separable data (the split: tests/test_sampling.py)."""

import numpy as np
import pytest
import torch

from pivotmap.models.evaluation import metrics
from pivotmap.models.features import fit_normalisation, has_data, network_input
from pivotmap.models.network import ModelSpec, build_model, count_parameters
from pivotmap.models.training import fit, predict_proba

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_missing_values_and_ages_are_encoded_for_the_network():
    spec = ModelSpec(classes=(1, 2), s2_channels=("B04", "age_s2"), s1_channels=("VV", "age_s1"))
    series = np.array([[[0.1, 0.0, np.nan, np.nan], [0.3, 90.0, -10.0, 2.0]]], dtype=np.float32)
    spec = fit_normalisation(series, spec)
    x = network_input(series, np.array([1, 183]), spec)
    assert x.shape == (1, 2, 6) and np.isfinite(x).all()
    assert x[0, 0, 2] == 0.0 and x[0, 0, 3] == 1.0  # missing VV → 0, its age → "nothing known"
    assert x[0, 1, 1] == 1.0  # age beyond the cap saturates
    assert has_data(series).tolist() == [True]


def test_training_learns_a_separable_problem_and_one_modality_suffices():
    rng = np.random.default_rng(0)
    n, t = 600, 12
    y = rng.integers(0, 3, n)
    spec = ModelSpec(
        classes=(10, 20, 30), s2_channels=("B08", "age_s2"), s1_channels=("VV", "age_s1"), hidden=16
    )
    series = np.zeros((n, t, 4), dtype=np.float32)
    phase = np.linspace(0, np.pi, t)
    series[:, :, 0] = np.sin(phase[None, :] + y[:, None]) + rng.normal(0, 0.2, (n, t))
    series[:, :, 2] = -10 + 3 * y[:, None] + rng.normal(0, 0.5, (n, t))
    spec = fit_normalisation(series, spec)
    x = network_input(series, np.arange(t) * 30, spec)
    model = fit(x[:400], y[:400], spec, epochs=15, batch_size=64, learning_rate=5e-3, seed=0).model
    proba = predict_proba(model, x[400:], 128)
    scores = metrics(
        np.array(spec.classes)[y[400:]], np.array(spec.classes)[proba.argmax(1)], spec.classes
    )
    assert scores["overall_accuracy"] > 0.9 and set(scores["per_class_f1"]) == {"10", "20", "30"}
    s1_only = series.copy()
    s1_only[:, :, :2] = np.nan  # S2 missing for every date
    proba = predict_proba(model, network_input(s1_only[400:], np.arange(t) * 30, spec), 128)
    assert proba.shape == (200, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_training_is_reproducible():
    spec = ModelSpec(classes=(1, 2), hidden=8)
    x = np.random.default_rng(1).normal(size=(64, 6, len(spec.channels))).astype(np.float32)
    y = np.arange(64) % 2
    a = fit(x, y, spec, epochs=2, batch_size=16, learning_rate=1e-3, seed=7).model.state_dict()
    b = fit(x, y, spec, epochs=2, batch_size=16, learning_rate=1e-3, seed=7).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert count_parameters(build_model(spec)) < 1_000_000


def test_fastest_threads_times_real_steps_and_restores_torch():
    from pivotmap.models.training import fastest_threads

    spec = ModelSpec(classes=(1, 2), hidden=8)
    x = np.zeros((64, spec.n_steps, len(spec.channels)), dtype=np.float32)
    before = torch.get_num_threads()
    picked = fastest_threads(spec, x, batch_size=32, repeats=1)
    assert picked in (1, before) and torch.get_num_threads() == before


def test_per_class_f1_metrics_carry_the_class_name():
    from pivotmap.models.trainer import named_f1

    named = named_f1({"3": 0.8, "7": 0.5, "9": 0.1}, {3: "Grassland", 7: "Winter cereals / rye"})
    assert named == {"3_grassland": 0.8, "7_winter_cereals_rye": 0.5, "9": 0.1}
