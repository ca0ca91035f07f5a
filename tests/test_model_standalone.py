"""The registered model is self-contained: it takes the raw daily series of the pivot cube, does
its own preprocessing, refuses wrong shapes, names no local path and no pivotmap requirement, and
predicts what pivotmap predicts, also in a fresh virtual environment where pivotmap is absent.

The fresh environment is `python -m venv` plus one `.pth` line that puts this virtualenv's
site-packages on its path (torch and mlflow are GBs to install): a path line in a `.pth` file does
not run the `.pth` files of that folder, so pivotmap's editable-install hook is not installed
there, and the script asserts that `import pivotmap` fails before it loads the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pivotmap.models.features import fit_normalisation, raw_series
from pivotmap.models.inference import classify
from pivotmap.models.network import ModelSpec, build_model
from pivotmap.models.registry import (
    _using_tracking_uri,
    log_and_register,
    pyfunc_inputs,
    tracking_uri_for,
)
from pivotmap.tasks.cube import PivotReader
from tests.pivot_data import build, write_obs

NAME = "pivotmap-standalone"
N_DAYS = 58  # not a multiple of STEP: the user pads the daily axis to n_steps * STEP days
STEP = 5
WINDOW = (slice(0, 32), slice(0, 32))


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> PivotReader:
    root = tmp_path_factory.mktemp("cube")
    urls = {"s2": str(root / "obs_s2.zarr"), "s1": str(root / "obs_s1.zarr")}
    write_obs(urls["s2"], "s2", np.arange(0, N_DAYS, 5))
    write_obs(urls["s1"], "s1", np.arange(1, N_DAYS, 6))
    build(str(root / "pivot.zarr"), urls, N_DAYS)
    return PivotReader(str(root / "pivot.zarr"))


@pytest.fixture(scope="module")
def registered(cube: PivotReader, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small network, normalised on the cube, registered as @champion in a SQLite registry."""
    out = tmp_path_factory.mktemp("standalone")
    base = ModelSpec(classes=(11, 22, 33), hidden=8, step_days=STEP)
    sampled = cube.window(*WINDOW, STEP)
    spec = fit_normalisation(raw_series(sampled, base.channels[:-2]), base)
    spec = spec.replace(n_steps=sampled.sizes["time"])  # as training sets it
    torch.manual_seed(3)
    net = build_model(spec).eval()
    uri = tracking_uri_for(out)
    result = log_and_register(
        tracking_uri=uri, artifact_root=None, experiment="standalone", model_name=NAME,
        model=net, spec=spec, params={"cube_url": str(out / "cube" / "pivot.zarr"), "epochs": 1},
        metrics={"macro_f1": 0.5}, validation_key="k",
        input_example=np.zeros((2, spec.n_steps, len(spec.channels)), np.float32),  # as trainer
    )  # fmt: skip
    assert result.promoted
    return {"uri": uri, "out": out, "net": net, "spec": spec, "run_id": result.run_id}


def daily_inputs(reader: PivotReader, n_days: int) -> dict[str, np.ndarray]:
    """What a user reads from the cube: dates and one [N, D] float32 series per variable, the
    daily axis padded with NaN days to `n_days`."""
    ds = reader.window(*WINDOW)
    pad = n_days - ds.sizes["time"]
    times = ds.time.values
    out = {
        "time": np.concatenate([times, times[-1] + np.arange(1, pad + 1) * np.timedelta64(1, "D")])
    }
    for name in ds.data_vars:
        values = ds[name].transpose("y", "x", "time").values.reshape(-1, ds.sizes["time"])
        out[str(name)] = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan)
    return out


def pivotmap_prediction(registered: dict, reader: PivotReader) -> tuple[np.ndarray, np.ndarray]:
    """Classes and confidence of the window as pivotmap's predict stage computes them."""
    spec = registered["spec"]
    classes, confidence = classify(
        registered["net"], spec, reader.window(*WINDOW, STEP), 4096, "cpu"
    )
    return classes.ravel(), confidence.ravel()


def model_inputs(registered: dict, reader: PivotReader) -> dict[str, np.ndarray]:
    spec = registered["spec"]
    inputs = daily_inputs(reader, spec.n_steps * STEP)
    return {name: inputs[name] for name in pyfunc_inputs(spec)}


def model_folder(registered: dict, tmp_path: Path) -> Path:
    import mlflow

    with _using_tracking_uri(registered["uri"]):
        return Path(
            mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path))
        )


def test_pyfunc_predicts_as_pivotmap_from_raw_daily_series(registered, cube) -> None:
    import mlflow

    with _using_tracking_uri(registered["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(model_inputs(registered, cube))
    classes, confidence = pivotmap_prediction(registered, cube)
    assert (classes != 255).any() and set(np.unique(classes)) - {255} <= {11, 22, 33}
    np.testing.assert_array_equal(out["class"].to_numpy(), classes)
    np.testing.assert_array_equal(out["confidence"].to_numpy(), confidence)
    proba = out[["p_11", "p_22", "p_33"]].to_numpy()
    mapped = classes != 255
    np.testing.assert_allclose(proba[mapped].sum(1), 1.0, rtol=1e-5)
    assert np.isnan(proba[~mapped]).all()


def test_pyfunc_moves_the_season_by_the_calendar_shift_as_pivotmap_does(registered, cube) -> None:
    """`params={"calendar_shift_days": d}`: the classes pivotmap's predict maps with that shift
    (a product's `pivotmap:calendar_shift_days`), from the same raw daily series."""
    import mlflow

    spec = registered["spec"]
    with _using_tracking_uri(registered["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    inputs = model_inputs(registered, cube)
    plain = model.predict(inputs)
    moved = model.predict(inputs, params={"calendar_shift_days": 3 * spec.step_days})
    classes, confidence = classify(
        registered["net"], spec, cube.window(*WINDOW, STEP), 4096, "cpu", shift_steps=3
    )
    np.testing.assert_array_equal(moved["class"].to_numpy(), classes.ravel())
    np.testing.assert_array_equal(moved["confidence"].to_numpy(), confidence.ravel())
    assert not np.array_equal(moved["confidence"].to_numpy(), plain["confidence"].to_numpy())
    again = model.predict(inputs, params={"calendar_shift_days": 0})
    np.testing.assert_array_equal(again["confidence"].to_numpy(), plain["confidence"].to_numpy())


def test_wrong_time_length_is_refused_with_the_expected_length(registered, cube) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    days = registered["spec"].n_steps * STEP
    inputs = model_inputs(registered, cube)
    short = {name: values[..., :10] for name, values in inputs.items()}
    with _using_tracking_uri(registered["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(MlflowException, match=rf"does not match expected shape \({days},\)"):
        model.predict(short)  # `time` is checked first
    with pytest.raises(MlflowException, match=rf"does not match expected shape \(-1, {days}\)"):
        model.predict({**inputs, "VV": inputs["VV"][:, :10]})
    with pytest.raises(MlflowException, match="dtype of input float64"):
        model.predict({**inputs, "B02": inputs["B02"].astype(np.float64)})
    # the model's own check, for callers that bypass MLflow's schema enforcement
    raw = model.unwrap_python_model()
    with pytest.raises(ValueError, match=rf"'time' has shape \(10,\): expected \[{days}\]"):
        raw.predict(None, short)
    with pytest.raises(ValueError, match="missing inputs.*VH"):
        raw.predict(None, {k: v for k, v in inputs.items() if k != "VH"})


def test_environment_names_no_pivotmap(registered, tmp_path: Path) -> None:
    from importlib.metadata import version

    folder = model_folder(registered, tmp_path)
    for name in ("requirements.txt", "conda.yaml", "python_env.yaml", "MLmodel"):
        assert "pivotmap" not in (folder / name).read_text().lower(), name
    pins = (folder / "requirements.txt").read_text().split()
    wanted = ("mlflow", "torch", "numpy", "pandas")
    assert pins == [f"{p}=={version(p).split('+')[0]}" for p in wanted]
    conda = yaml.safe_load((folder / "conda.yaml").read_text())
    assert pins == conda["dependencies"][-1]["pip"]
    assert (folder / "code" / "pivot_series.py").is_file()
    code = (folder / "code" / "pivot_series.py").read_text() + (
        folder / "mlflow_pyfunc.py"
    ).read_text()
    assert "import pivotmap" not in code and "from pivotmap" not in code


def test_no_local_path_in_mlmodel_params_or_tags(registered, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    folder = model_folder(registered, tmp_path)
    mlmodel = (folder / "MLmodel").read_text()
    for local in (str(registered["out"]), str(Path(__file__).parents[1]), "/tmp", "file:"):
        assert local not in mlmodel, local
    flavor = yaml.safe_load(mlmodel)["flavors"]["python_function"]
    assert flavor["model_code_path"] == "mlflow_pyfunc.py"
    assert all(set(a) == {"path"} for a in flavor["artifacts"].values())
    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    run = client.get_run(registered["run_id"])
    assert run.data.params["cube_url"] == "pivot.zarr"
    logged = client.get_logged_model(yaml.safe_load(mlmodel)["model_id"])
    for tags in (run.data.tags, logged.tags):
        assert "/" not in tags["mlflow.source.name"], tags["mlflow.source.name"]


def test_exported_network_holds_no_pickle(registered, tmp_path: Path) -> None:
    folder = model_folder(registered, tmp_path)
    network = folder / "artifacts" / "network.pt2"
    from pivotmap.models.mlflow_pyfunc import load_network, pickled_entries

    assert pickled_entries(str(network)) == []
    planted = tmp_path / "planted.pt2"
    with zipfile.ZipFile(network) as src, zipfile.ZipFile(planted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="pickled payloads"):
        load_network(str(planted), torch.device("cpu"))


FRESH_SCRIPT = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("pivotmap") is None, "pivotmap is importable"
import mlflow
from mlflow.exceptions import MlflowException
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/{name}@champion")
inputs = dict(np.load(sys.argv[2]))
out = model.predict(inputs)
try:
    model.predict({{k: v[..., :10] for k, v in inputs.items()}})
    refused = ""
except MlflowException as err:
    refused = str(err)
np.savez(sys.argv[3], classes=out["class"].to_numpy(), confidence=out["confidence"].to_numpy())
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "pivotmap")
print(json.dumps({{"refused": refused, "leaked": leaked, "mlflow": mlflow.__file__}}))
"""


def fresh_venv(folder: Path) -> Path:
    """A new virtualenv that sees this one's packages through a path line, pivotmap excluded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_model_runs_in_a_fresh_venv_without_pivotmap(registered, cube, tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "venv")
    script, inputs, result = tmp_path / "predict.py", tmp_path / "in.npz", tmp_path / "out.npz"
    script.write_text(textwrap.dedent(FRESH_SCRIPT.format(name=NAME)))
    np.savez(inputs, **model_inputs(registered, cube))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_TRACKING"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    done = subprocess.run(
        [python, str(script), registered["uri"], str(inputs), str(result)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    days = registered["spec"].n_steps * STEP
    assert f"does not match expected shape ({days},)" in report["refused"]
    got = np.load(result)
    classes, confidence = pivotmap_prediction(registered, cube)
    assert (classes != 255).sum() > 100
    np.testing.assert_array_equal(got["classes"], classes)
    np.testing.assert_array_equal(got["confidence"], confidence)


def test_preprocessing_day_of_year_matches_pandas_across_leap_years() -> None:
    import pandas as pd

    from pivotmap.models import pivot_series

    dates = np.arange("2023-01-01", "2025-12-31", dtype="datetime64[D]").astype("datetime64[ns]")
    np.testing.assert_array_equal(
        pivot_series.day_of_year(dates), pd.DatetimeIndex(dates).day_of_year.to_numpy()
    )
    np.testing.assert_array_equal(pivot_series.sample_days(12, 5), [0, 5, 10])
