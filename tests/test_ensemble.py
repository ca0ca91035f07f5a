"""Ensembles (`train.ensemble_members`, issue 15): members trained with seeds seed, seed+1, …
from one pretraining, registered as one model that averages their class probabilities; the
share of members that chose a pixel's class scales its confidence, in pivotmap's maps and in
the MLflow pyfunc alike; one member trains, registers and maps as a single network always did.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xarray as xr

from pivotmap.config import TrainConfig
from pivotmap.models.datamodule import prepare_data
from pivotmap.models.inference import classify
from pivotmap.models.network import (
    EnsembleClassifier,
    FusionClassifier,
    ModelSpec,
    build_model,
    ensemble_of,
)
from pivotmap.models.trainer import _ensemble_summary, fit_models, run_metrics
from pivotmap.models.training import confidence_percent, predict_proba, predict_vote
from pivotmap.results import TrainResult
from tests.test_transfer import _table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "pivotmap-ensemble"
TINY = {"epochs": 3, "pretrain_epochs": 1, "hidden": 8, "batch_size": 32, "baseline_trees": 0}
TINY |= {"cpu_threads": 1, "max_unlabelled_pixels": 100}


def _members(spec: ModelSpec, seeds: tuple[int, ...]) -> list[torch.nn.Module]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build_model(spec).eval())
    return out


def test_an_ensemble_averages_its_members_and_counts_their_agreement():
    spec = ModelSpec(classes=(1, 2, 3), hidden=8, n_steps=6)
    x = np.random.default_rng(0).normal(size=(200, 6, len(spec.channels))).astype(np.float32)
    a, b = _members(spec, (1, 2))  # untrained: they disagree on many pixels
    ensemble = ensemble_of([a, b])
    assert isinstance(ensemble, EnsembleClassifier) and ensemble.spec.members == 2
    pa, pb = predict_proba(a, x, 64), predict_proba(b, x, 64)
    proba, agreement = predict_vote(ensemble, x, 64)
    assert agreement is not None
    np.testing.assert_allclose(proba, (pa + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(predict_proba(ensemble, x, 64), proba, atol=1e-5)  # forward
    agree = pa.argmax(1) == pb.argmax(1)
    assert agree.any() and (~agree).any()
    assert np.all(agreement[agree] == 1.0) and np.all(agreement[~agree] <= 0.5)
    assert agreement.min() >= 0.0 and agreement.max() <= 1.0
    np.testing.assert_array_equal(
        confidence_percent(proba, agreement), np.rint(proba.max(1) * agreement * 100)
    )
    # the spec alone rebuilds it (as prediction workers and the registry do)
    rebuilt = build_model(ensemble.spec.to_dict())
    rebuilt.load_state_dict(ensemble.state_dict())
    np.testing.assert_array_equal(predict_vote(rebuilt.eval(), x, 64)[0], proba)
    # one network: itself, no agreement, the confidence of before
    assert ensemble_of([a]) is a
    single, none = predict_vote(a, x, 64)
    assert none is None and np.array_equal(single, pa)
    np.testing.assert_array_equal(
        confidence_percent(pa, None), np.rint(pa.max(1) * 100).astype(np.uint8)
    )
    with pytest.raises(ValueError, match="share one ModelSpec"):
        ensemble_of([a, *_members(spec.replace(hidden=16), (3,))])


@pytest.fixture(scope="module")
def trained() -> dict:
    """The classifier of a small separable table trained with 2 members and with 1."""
    runs = {}
    for n in (2, 1):
        tc = TrainConfig(**TINY, ensemble_members=n)
        data = prepare_data(SimpleNamespace(train=tc), _table(200))
        runs[n] = fit_models(data, SimpleNamespace(train=tc), "cpu", None, None, lambda f: f)
    return {"data": data, "runs": runs}


def test_members_train_with_their_own_seeds_and_are_scored_each(trained):
    two, one = trained["runs"][2], trained["runs"][1]
    model = two.model
    assert isinstance(model, EnsembleClassifier) and model.spec.members == 2
    first, second = (m.state_dict() for m in model.members)
    assert not all(torch.equal(first[k], second[k]) for k in first)  # seed 1 differs
    assert all(torch.equal(first[k], v) for k, v in one.model.state_dict().items())  # seed 0
    spread = two.members
    assert spread["members"] == 2 and spread["seeds"] == [0, 1]
    for key in ("overall_accuracy", "macro_f1"):
        per = spread[key]["per_member"]
        assert len(per) == 2 and spread[key]["mean"] == pytest.approx(np.mean(per), abs=1e-4)
        assert spread[key]["std"] == pytest.approx(np.std(per), abs=1e-4)
    assert spread["overall_accuracy"]["per_member"][0] == round(one.scores["overall_accuracy"], 4)
    figures = two.scores["agreement"]
    assert 0.5 <= figures["mean"] <= 1.0 and 0.0 <= figures["unanimous_share"] <= 1.0
    flat = run_metrics(two.scores, None, None, {1: "one", 2: "two"}, two.members)
    assert flat["ensemble_members"] == 2 and flat["member_macro_f1"] == dict(
        enumerate(spread["macro_f1"]["per_member"])
    )
    assert set(flat["members_overall_accuracy"]) == {"mean", "std", "min", "max"}
    assert "ensemble" in TrainResult.model_fields  # the run summary (`pivotmap train --json`)
    assert _ensemble_summary(two.members, two.scores) == spread | {"agreement": figures}
    assert _ensemble_summary(one.members, one.scores) is None
    # one member: a single network, scored and reported as before
    assert isinstance(one.model, FusionClassifier) and one.members is None
    assert "agreement" not in one.scores
    assert set(run_metrics(one.scores, None, None, {})) == {
        "overall_accuracy", "macro_f1", "kappa", "f1", "parameters", "flops_per_pixel",
    }  # fmt: skip


def _window(series: np.ndarray, dates: np.ndarray, names: tuple[str, ...]) -> xr.Dataset:
    """A 1-row window of the cube (sampled every step) holding `series` [N, T, C]."""
    values = {
        name: (("time", "y", "x"), series[:, :, c].T[:, None, :]) for c, name in enumerate(names)
    }
    return xr.Dataset(values, coords={"time": dates})


def test_the_registered_ensemble_predicts_the_members_mean(trained, tmp_path):
    """Registered, the ensemble's pyfunc gives the members' mean probabilities and a confidence
    scaled by their agreement: what pivotmap's maps hold."""
    import mlflow

    from pivotmap.models.features import network_input
    from pivotmap.models.registry import (
        _using_tracking_uri,
        load_model,
        log_and_register,
        pyfunc_inputs,
        tracking_uri_for,
    )

    data, model = trained["data"], trained["runs"][2].model
    spec = model.spec
    uri = tracking_uri_for(tmp_path)
    flat = run_metrics(trained["runs"][2].scores, None, None, {}, trained["runs"][2].members)
    log_and_register(
        tracking_uri=uri, artifact_root=None, experiment="ensemble", model_name=NAME,
        model=model, spec=spec, params={"ensemble_members": 2}, metrics=flat, validation_key="k",
    )  # fmt: skip
    loaded = load_model(tracking_uri=uri, model_uri=f"models:/{NAME}@champion")
    assert isinstance(loaded.model, EnsembleClassifier) and loaded.spec == spec

    # pixels of the table, some with noise so that the members disagree, as daily series
    names = spec.channels[:-2]
    raw = data.table.decoded(names, np.arange(60))
    noise = np.random.default_rng(4).normal(1, 0.6, raw.shape).astype(np.float32)
    raw[30:] *= np.where(np.char.startswith(np.array(names), "age_"), 1, noise[30:])
    days = spec.n_steps * spec.step_days
    dates = np.datetime64("2023-01-01", "ns") + np.arange(days) * np.timedelta64(1, "D")
    daily = np.repeat(raw, spec.step_days, axis=1)
    inputs = {"time": dates} | {n: daily[:, :, c] for c, n in enumerate(names)}
    assert set(inputs) == set(pyfunc_inputs(spec))
    with _using_tracking_uri(uri):
        out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(inputs)

    x = network_input(raw, data.table.doy[0], spec)
    pa, pb = (predict_proba(m, x, 64) for m in model.members)
    proba = out[[f"p_{c}" for c in spec.classes]].to_numpy()
    np.testing.assert_allclose(proba, (pa + pb) / 2, atol=1e-5)
    agree = pa.argmax(1) == pb.argmax(1)
    assert agree.any() and (~agree).any()
    confidence = out["confidence"].to_numpy()
    assert np.all(confidence[~agree] <= 50)  # half the members or none chose the class
    window = _window(raw, dates[:: spec.step_days], names)
    classes, in_map = (a.ravel() for a in classify(loaded.model, spec, window, 64, "cpu"))
    np.testing.assert_array_equal(out["class"].to_numpy(), classes)
    np.testing.assert_array_equal(confidence, in_map)
    expected, agreement = predict_vote(model, x, 64)
    np.testing.assert_array_equal(in_map, confidence_percent(expected, agreement))


@pytest.mark.slow
def test_the_chain_trains_and_maps_with_an_ensemble(prefect_server, tmp_path):
    """`pivotmap train` with 2 members: its summary reports the members' spread, the version
    holds the ensemble, and predict maps with it (confidence within 0–100)."""
    from tests.small_runs import cli, generate_small_region, write_small_config

    generate_small_region(tmp_path / "data")
    layer = {"train": {"ensemble_members": 2}, "concept": {"enabled": False}}
    config = write_small_config(
        tmp_path, "c.yaml", tmp_path / "mlflow.db", layer, {"predict": {"dask": "none"}}
    )
    done = {}
    for stage in ("ingest", "pivot", "sample", "train", "predict"):
        code, done[stage], _ = cli([stage, "--config", str(config), "--out", str(tmp_path / "run")])
        assert code == 0, f"{stage}: {done[stage].get('error')}"
    ensemble = done["train"]["ensemble"]
    assert ensemble["members"] == 2 and ensemble["seeds"] == [0, 1]
    assert len(ensemble["macro_f1"]["per_member"]) == 2 and 0 <= ensemble["agreement"]["mean"] <= 1
    maps = sorted((tmp_path / "run" / "maps").glob("*.npz"))
    assert maps
    for path in maps:
        with np.load(path) as tile:
            mapped = tile["classes"] != 255
            assert mapped.any() and (tile["confidence"][mapped] <= 100).all()
