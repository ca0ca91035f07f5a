"""The MLflow registry helpers, for real, on a SQLite tracking database in a temporary folder.

One registry is shared by the module (MLflow costs seconds per database): v1 becomes champion,
a worse v2 does not, a better v3 does, and v4, validated on other data, is not compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pivotmap.models.network import ModelSpec, build_model
from pivotmap.models.registry import (
    ChampionInfo,
    _public_value,
    _using_tracking_uri,
    load_champion,
    log_and_register,
    promotion_decision,
    public_mlmodel,
    tracking_uri_for,
)

NAME = "pivotmap-test"
KEY = "tiles-E36N28-seed0"
SPEC = ModelSpec(classes=(1, 2, 3), hidden=8, n_steps=6)
# version -> (macro_f1, validation key)
SCENARIO = {"1": (0.60, KEY), "2": (0.50, KEY), "3": (0.70, KEY), "4": (0.90, "other-key")}


def _inputs(n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, SPEC.n_steps, len(SPEC.channels))).astype(np.float32)


STARTED_AT = 1_790_000_000.0  # when version 2's training "began": its run starts then


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Register the four scenario versions; the results, models and URI for the tests."""
    out = tmp_path_factory.mktemp("registry")
    uri = tracking_uri_for(out)
    summary = out / "summary.json"
    summary.write_text(json.dumps({"pixels": 10}))
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    results, models = {}, {}
    for i, (f1, key) in enumerate(SCENARIO.values(), start=1):
        torch.manual_seed(i)
        models[str(i)] = build_model(SPEC)
        results[str(i)] = log_and_register(
            tracking_uri=uri,
            artifact_root=None,
            experiment="test",
            model_name=NAME,
            model=models[str(i)],
            spec=SPEC,
            params={"epochs": 1, "opt": {"lr": 1e-3}},
            metrics={"macro_f1": f1, "f1": {1: f1, 2: f1, 3: f1}},
            validation_key=key,
            artifacts={"summary": summary},
            tags={"pivotmap.stage": "test"},
            input_example=_inputs(2) if i == 1 else None,
            run_name=f"scenario {i}",
            started_at=STARTED_AT if i == 2 else None,
        )
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # global state restored
    return {"uri": uri, "out": out, "results": results, "models": models}


def test_tracking_uri_default_and_override(tmp_path: Path) -> None:
    assert tracking_uri_for(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert tracking_uri_for(tmp_path, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_promotion_sequence(registry: dict) -> None:
    r = registry["results"]
    assert [r[v].version for v in "1234"] == ["1", "2", "3", "4"]
    assert r["1"].promoted and r["1"].champion_version == "1"
    assert not r["2"].promoted and r["2"].champion_version == "1"
    assert "0.5000" in r["2"].reason and "0.6000" in r["2"].reason
    assert r["3"].promoted and r["3"].champion_version == "3"
    assert not r["4"].promoted and r["4"].champion_version == "3"
    assert "different key" in r["4"].reason and "other-key" in r["4"].reason
    assert r["3"].uri == f"models:/{NAME}/3"


def test_run_records_metrics_tags_and_artifacts(registry: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    result = registry["results"]["2"]
    run = client.get_run(result.run_id)
    assert run.data.metrics["macro_f1"] == 0.5 and run.data.metrics["f1_3"] == 0.5
    # a named run lasting the training, not the logging; an experiment opened as ML, not GenAI
    assert run.info.run_name == "scenario 2" and run.info.start_time == STARTED_AT * 1000
    assert run.info.end_time > run.info.start_time
    assert client.get_run(registry["results"]["1"].run_id).info.run_name == "scenario 1"
    kind = client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    assert run.data.params["opt.lr"] == "0.001"
    assert run.data.tags["pivotmap.validation_key"] == KEY
    assert "summary.json" in {a.path for a in client.list_artifacts(result.run_id)}
    version = client.get_model_version(NAME, "2")
    assert version.run_id == result.run_id
    assert version.tags["pivotmap.validation_key"] == KEY
    assert float(version.tags["metric.macro_f1"]) == 0.5
    artifacts = registry["out"] / "mlflow" / "artifacts"
    assert artifacts.is_dir()  # default artifact root: next to the database


def test_load_champion_returns_champion_weights(registry: dict) -> None:
    net, spec, info = load_champion(tracking_uri=registry["uri"], model_name=NAME)
    assert info == {
        "name": NAME,
        "version": "3",
        "run_id": registry["results"]["3"].run_id,
        "uri": f"models:/{NAME}/3",
    }
    assert spec == SPEC and not net.training
    expected = registry["models"]["3"].state_dict()
    loaded = net.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_pyfunc_predicts_class_codes(registry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pyfunc takes daily series and dates, samples and prepares them as pivotmap does."""
    import mlflow

    from pivotmap.models.features import network_input

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    days = SPEC.n_steps * SPEC.step_days
    rng = np.random.default_rng(1)
    series = rng.normal(size=(7, days, len(SPEC.channels) - 2)).astype(np.float32)
    series[0] = np.nan  # a pixel with no data
    dates = np.datetime64("2023-12-20", "ns") + np.arange(days) * np.timedelta64(1, "D")
    inputs = {"time": dates} | {n: series[:, :, c] for c, n in enumerate(SPEC.channels[:-2])}
    out = pyfunc.predict(inputs)
    assert list(out.columns) == ["class", "confidence", "p_1", "p_2", "p_3"] and len(out) == 7
    sampled = series[1:, :: SPEC.step_days]
    doy = pd.DatetimeIndex(dates[:: SPEC.step_days]).day_of_year.to_numpy()  # 354 … 1 …
    champion = registry["models"]["3"].eval()
    with torch.no_grad():
        logits = champion(torch.from_numpy(network_input(sampled, doy, SPEC)))
    expected = np.array(SPEC.classes)[logits.argmax(-1).numpy()]
    np.testing.assert_array_equal(out["class"].to_numpy(), [255, *expected])
    assert out["confidence"].iloc[0] == 255 and out["confidence"].iloc[1:].between(0, 100).all()


def test_artifact_holds_no_pickle(
    registry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/3", dst_path=tmp_path)
    )
    names = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"model.safetensors", "spec.json", "network.pt2", "mlflow_pyfunc.py", "MLmodel"} <= names
    assert "pivot_series.py" in names  # the preprocessing travels with the model
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))]


def test_unknown_model_and_alias_raise_lookup_error(registry: dict, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="no-such-model.*pivotmap train"):
        load_champion(tracking_uri=registry["uri"], model_name="no-such-model")
    with pytest.raises(LookupError, match="@staging"):
        load_champion(tracking_uri=registry["uri"], model_name=NAME, alias="staging")
    missing = tracking_uri_for(tmp_path)
    with pytest.raises(LookupError, match=NAME):
        load_champion(tracking_uri=missing, model_name=NAME)
    assert not (tmp_path / "mlflow").exists()  # loading creates no empty database


def test_bad_inputs_fail_before_logging(registry: dict) -> None:
    common = dict(
        tracking_uri=registry["uri"],
        artifact_root=None,
        experiment="test",
        model_name=NAME,
        model=registry["models"]["1"],
        spec=SPEC,
        params={},
        validation_key=KEY,
    )
    with pytest.raises(ValueError, match="macro_f1"):
        log_and_register(**common, metrics={"accuracy": 0.9})
    with pytest.raises(RuntimeError):  # weights that do not fit the spec
        log_and_register(
            **{**common, "spec": ModelSpec(classes=(1, 2), hidden=8)}, metrics={"macro_f1": 0.9}
        )


def test_promotion_decision_rules() -> None:
    champ = ChampionInfo(version="3", macro_f1=0.64, validation_key="k")
    assert promotion_decision("1", 0.5, "k", None)[0]
    assert promotion_decision("4", 0.65, "k", champ)[0]
    promoted, reason = promotion_decision("4", 0.64, "k", champ)  # a tie keeps the champion
    assert not promoted and "0.6400 ≤ champion v3" in reason
    promoted, reason = promotion_decision("4", 0.99, "j", champ)
    assert not promoted and "different key" in reason


def test_local_paths_become_names_and_urls_stay() -> None:
    assert _public_value("/tmp/run/cube/pivot.zarr") == "pivot.zarr"
    assert _public_value("/tmp/run/cube/pivot.zarr/") == "pivot.zarr"
    assert _public_value("file:///data/labels.gpkg") == "labels.gpkg"
    assert _public_value("~/maps/labels.gpkg") == "labels.gpkg"
    assert _public_value("C:\\runs\\pivot.zarr") == "pivot.zarr"
    for kept in ("s3://bucket/run/pivot.zarr", "https://example.org/x", "0.001", "fusion"):
        assert _public_value(kept) == kept


def test_public_mlmodel_drops_producer_paths() -> None:
    raw = {
        "artifact_path": "file:///tmp/x/mlflow/artifacts/models/m-1/artifacts",
        "flavors": {
            "python_function": {
                "artifacts": {
                    "spec": {"path": "artifacts/spec.json", "uri": "/tmp/tmpab/spec.json"}
                },
                "model_code_path": "/home/me/pivotmap/models/mlflow_pyfunc.py",
                "code": "code",
            },
            "other": {"kept": True},
        },
        "run_id": "abc",
    }
    out = public_mlmodel(raw)
    assert "/tmp" not in json.dumps(out) and "/home" not in json.dumps(out)
    pyfunc = out["flavors"]["python_function"]
    assert pyfunc["artifacts"] == {"spec": {"path": "artifacts/spec.json"}}
    assert pyfunc["model_code_path"] == "mlflow_pyfunc.py" and pyfunc["code"] == "code"
    assert out["flavors"]["other"] == {"kept": True} and out["run_id"] == "abc"


def test_versions_logged_before_the_export_still_load(tmp_path: Path) -> None:
    """A version with only weights + spec (the pyfunc of pivotmap <= issue 15) loads as before."""
    import mlflow
    from safetensors.torch import save_file

    torch.manual_seed(7)
    old = build_model(SPEC)
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, tmp_path / "w.safetensors")
    (tmp_path / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    code = tmp_path / "old_pyfunc.py"
    code.write_text(
        "import mlflow\nfrom mlflow.pyfunc import PythonModel\n\n\n"
        "class Old(PythonModel):\n    def predict(self, context, model_input, params=None):\n"
        "        return model_input\n\n\nmlflow.models.set_model(Old())\n"
    )
    uri = tracking_uri_for(tmp_path / "old")
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    with _using_tracking_uri(uri), mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code), pip_requirements=["mlflow"],
            artifacts={"weights": str(tmp_path / "w.safetensors"),
                       "spec": str(tmp_path / "spec.json")},
        )  # fmt: skip
        version = mlflow.register_model(info.model_uri, "old-model").version
        mlflow.MlflowClient().set_registered_model_alias("old-model", "champion", version)
    net, spec, _ = load_champion(tracking_uri=uri, model_name="old-model")
    assert spec == SPEC
    assert all(torch.equal(net.state_dict()[k], v) for k, v in old.state_dict().items())
