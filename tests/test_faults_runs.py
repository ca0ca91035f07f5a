"""Whole runs under faults: planted secrets, kill -9 during ingest and predict, and load.

One production run (`pivotmap produce` in a subprocess, against the session's Prefect server) maps
a 5 x 5-tile region served over HTTP with signed asset hrefs, and publishes to S3 (moto). Its
secrets (AWS secret key, session token, the href token) are searched for everywhere the run
leaves text. Its cube and model then serve the crash and load tests (100 tiles of 16 px).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests import faults_data as fd
from tests.flaky_server import serve_flaky

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
PIVOTMAP = str(Path(sys.executable).with_name("pivotmap"))
GRID = 5  # tiles of 32 px a side: 160 x 160 px, 100 tiles of 16 px
PERIOD = ("2023-05-01", "2023-06-30")  # 13 S2 and 11 S1 dates: short, the run is for faults
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"planted-secret-{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"planted-session-{uuid.uuid4().hex}",
    fd.TOKEN_ENV: f"planted-href-token-{uuid.uuid4().hex}",
}


def _env(prefect_api: str, s3: str) -> dict[str, str]:
    env = {**os.environ, **SECRETS, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api}
    env.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_ENDPOINT_URL=s3,
               AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    return env


def _run(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PIVOTMAP, *args, "--json"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def prefect_api(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def base(tmp_path_factory, prefect_api, s3_server):
    """The produce run; yields its folders, config, subprocess output and environment."""
    from pivotmap.tasks.storage import s3_client

    root = tmp_path_factory.mktemp("runs")
    data = root / "data"
    fd.make_region(data, tiles_x=GRID, tiles_y=GRID, dates=PERIOD)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3_client().create_bucket(Bucket=bucket)
    env = _env(prefect_api, s3_server)
    with serve_flaky(data, rate=0.0) as server:
        raw = fd.config_dict(
            data, tiles_x=GRID, tiles_y=GRID, dates=PERIOD,
            source={"url": server.url + "catalog.json",
                    "href_modifier": "tests.faults_data:sign_hrefs"},
            publish={"target": f"s3://{bucket}/maps"},
        )  # fmt: skip
        config = fd.write_config(root / "run.yaml", raw)
        out = root / "out"
        result = _run(["produce", "--config", str(config), "--out", str(out)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        yield {"root": root, "out": out, "config": config, "raw": raw, "result": result,
               "env": env, "bucket": bucket, "server": server}  # fmt: skip


# ---------------------------------------------------------------------------- secrets


def test_planted_secrets_appear_nowhere(base):
    """Logs (CLI stdout/stderr, Prefect's log store), Prefect artifacts and flow parameters,
    every file of the run folder (reports, STAC, MLflow database and artifacts, state, cube
    metadata) and every published S3 object are searched for the three planted secrets."""
    from prefect.client.orchestration import get_client

    from pivotmap.tasks.storage import s3_client

    texts: dict[str, bytes] = {
        "stdout": base["result"].stdout.encode(),
        "stderr": base["result"].stderr.encode(),
    }
    for path in base["out"].rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    client = s3_client()
    listed = client.list_objects_v2(Bucket=base["bucket"]).get("Contents", [])
    for obj in listed:
        texts[f"s3:{obj['Key']}"] = client.get_object(Bucket=base["bucket"], Key=obj["Key"])[
            "Body"
        ].read()
    with get_client(sync_client=True) as prefect:
        runs = _all(prefect.read_flow_runs)
        logs = _all(prefect.read_logs)
        artifacts = _all(prefect.read_artifacts)
    for name, rows in (("flow-runs", runs), ("logs", logs), ("artifacts", artifacts)):
        texts[f"prefect:{name}"] = json.dumps([r.model_dump(mode="json") for r in rows]).encode()
    assert any(k.endswith("mlflow.db") for k in texts) and len(listed) > 10
    assert len(logs) > 10 and len(artifacts) > 2 and len(runs) >= 5
    leaks = [(name, where) for name, secret in SECRETS.items()
             for where, blob in texts.items() if secret.encode() in blob]  # fmt: skip
    assert leaks == []
    # the run did use the secrets: its COG requests carried the planted href token
    signed = sum(n for q, n in base["server"].queries.items() if SECRETS[fd.TOKEN_ENV] in q)
    assert signed > 100


def _all(read, page: int = 200) -> list:
    """Every record a Prefect client `read_*` method pages through."""
    rows: list = []
    while batch := read(limit=page, offset=len(rows)):
        rows += batch
    return rows


def test_signed_href_in_a_read_failure_is_reported_without_its_token(base, tmp_path):
    from pivotmap.tasks.load import _read_error, _read_raw

    token = SECRETS[fd.TOKEN_ENV]
    url = f"{base['server'].url}sentinel-2-l2a/nowhere/B04.tif?sig={token}"
    with pytest.raises(Exception) as failure:
        _read_raw(url, (), "nearest", "uint8", 0)
    assert token in str(failure.value)  # GDAL's own message carries the URL...
    reason = _read_error(failure.value)
    assert "nowhere/B04.tif" in reason and token not in reason  # ...the report does not


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b", "..", "a/./../.."])
def test_object_keys_from_region_names_cannot_escape_their_prefix(name):
    from pivotmap.tasks import storage

    with pytest.raises(storage.StorageError, match="escape"):
        storage.parse("s3://bucket/maps").join(name)
    with pytest.raises(storage.StorageError, match="escape"):
        storage.parse("/srv/maps").join(name)


def test_run_names_that_could_escape_are_refused_by_the_config(tmp_path):
    from pivotmap.config import ConfigError, load_run_config

    for name in ("../up", "/abs", "a/b", "..", "UPPER"):
        raw = fd.config_dict(tmp_path, name=name)
        with pytest.raises(ConfigError, match="name"):
            load_run_config(fd.write_config(tmp_path / "bad.yaml", raw))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_model_weights_never_load_through_pickle(base, tmp_path):
    """A planted pickle (.pt/.pkl, with a payload that would run a command) is refused; the
    worker loader reads safetensors only; the registry artifact holds no pickle."""
    import pickle

    import torch

    from pivotmap.models.inference import load_for_worker

    _Evil.marker = tmp_path / "pwned"
    model_dir = next((base["out"] / "models").iterdir())
    planted = tmp_path / "planted"
    shutil.copytree(model_dir, planted)
    payload = pickle.dumps(_Evil())
    (planted / "weights.safetensors").write_bytes(payload)
    (planted / "model.pt").write_bytes(payload)
    (planted / "model.pkl").write_bytes(payload)
    load_for_worker.cache_clear()
    with pytest.raises(Exception, match="(?i)header|safetensor|deserializ|invalid"):
        load_for_worker(str(planted), "cpu")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(planted / "model.pt", weights_only=True)  # torch's safe loader refuses it
    assert not _Evil.marker.exists()
    artifacts = base["out"] / "mlflow"
    suffixes = {p.suffix for p in artifacts.rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pt", ".pth", ".joblib"}, suffixes
    assert any(artifacts.rglob("*.safetensors"))


def test_no_code_path_unpickles():
    """Production code loads weights with safetensors (or torch's weights_only loader) only."""
    import re

    risky = re.compile(
        r"pickle\.loads?\(|joblib\.load\(|dill\.loads?\(|torch\.load\((?![^)]*weights_only=True)"
    )
    hits = [f"{path.relative_to(REPO)}:{n}" for folder in ("flows", "tasks", "models")
            for path in (REPO / folder).rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if risky.search(line)]  # fmt: skip
    assert hits == []


# ---------------------------------------------------------------------------- crashes


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _kill_when(args: list[str], env: dict, predicate) -> int:
    """Start `pivotmap ARGS`, kill -9 it once `predicate()` holds; its return code."""
    proc = subprocess.Popen([PIVOTMAP, *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        if _wait_for(predicate, proc):
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and any child it started
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def test_kill_during_ingest_then_rerun_redoes_nothing_finished(base, tmp_path):
    out = tmp_path / "out"
    args = ["ingest", "--config", str(base["config"]), "--out", str(out)]
    s2, s1 = out / "state" / "ingest-s2", out / "state" / "ingest-s1"
    code = _kill_when(args, base["env"], lambda: len(list(s2.glob("*.json"))) == GRID * GRID)
    assert code == -signal.SIGKILL
    finished = _mtimes(s2)
    assert len(finished) == GRID * GRID and len(_mtimes(s1)) < GRID * GRID  # killed mid-way
    result = _run(args, base["env"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])["modalities"]
    assert sorted(report["s2"]["tiles_already_done"]) == sorted(p[:-5] for p in finished)
    assert report["s2"]["tiles_written"] == [] and _mtimes(s2) == finished
    assert len(report["s1"]["tiles_written"]) == GRID * GRID - len(
        report["s1"]["tiles_already_done"]
    )
    for cube in ("obs_s2.zarr", "obs_s1.zarr"):  # same bytes as the uninterrupted run
        assert fd.digests(out / "cube" / cube) == fd.digests(base["out"] / "cube" / cube), cube
    print(f"\ncrash ingest: killed with {len(finished)} S2 tiles done, "
          f"{len(report['s1']['tiles_already_done'])} S1 tiles done; obs cubes byte-identical")  # fmt: skip


def _predict_workspace(base, folder: Path, **predict) -> Path:
    """A run folder over the base run's cube and model, tiled 16 px (100 tiles)."""
    (folder / "cube").mkdir(parents=True)
    shutil.copytree(base["out"] / "cube" / "pivot.zarr", folder / "cube" / "pivot.zarr")
    (folder / "reports").mkdir()
    shutil.copy(base["out"] / "reports" / "pivot.json", folder / "reports" / "pivot.json")
    raw = json.loads(json.dumps(base["raw"]))
    raw["grid"]["tile_size"] = 16
    raw["predict"] = {**raw["predict"], **predict}
    tracking = f"sqlite:///{base['out'] / 'mlflow' / 'mlflow.db'}"
    raw["mlflow"] = {"tracking_uri": tracking}
    return fd.write_config(folder / "run16.yaml", raw)


def _maps(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for path in sorted((folder / "maps").glob("*.npz")):
        with np.load(path) as data:
            out[path.stem] = (data["classes"], data["confidence"])
    return out


@pytest.fixture(scope="module")
def load_run(base, tmp_path_factory, prefect_server):
    """predict over 100 tiles of 16 px on a LocalCluster of 2 worker processes."""
    from pivotmap.config import load_run_config
    from pivotmap.flows.predict import predict_flow

    folder = tmp_path_factory.mktemp("load")
    config = _predict_workspace(base, folder, dask="local", workers=2, window=16)
    started = time.monotonic()
    summary = predict_flow(load_run_config(config), str(folder)).to_dict()
    return folder, summary, time.monotonic() - started


PEAK_RSS_BOUND_MB = 1500  # a worker holds torch, the model and one 16 px window at a time


def test_load_100_tiles_on_two_dask_workers(load_run):
    folder, summary, seconds = load_run
    tiles = summary["tiles"]
    assert len(tiles) == 100 and summary["tiles_already_done"] == []  # no failed task
    assert len(list((folder / "state" / "predict").glob("*.json"))) == 100
    maps = _maps(folder)
    assert len(maps) == 100 and all(t["mapped_fraction"] > 0.9 for t in tiles)
    peak = summary["peak_rss_mb_per_worker"]
    assert 0 < peak < PEAK_RSS_BOUND_MB
    print(f"\nload: 100 tiles, 2 workers, {seconds:.1f} s, peak RSS per worker {peak:.0f} MB, "
          f"{summary['px_per_s']:.0f} px/s")  # fmt: skip


def test_kill_during_predict_then_rerun_redoes_nothing_finished(base, load_run, tmp_path):
    folder = tmp_path / "crash"
    config = _predict_workspace(base, folder, dask="none", window=16)
    args = ["predict", "--config", str(config), "--out", str(folder)]
    state = folder / "state" / "predict"
    code = _kill_when(args, base["env"], lambda: len(list(state.glob("*.json"))) >= 10)
    assert code == -signal.SIGKILL
    finished = _mtimes(state)
    maps_before = {p.name: p.stat().st_mtime_ns for p in (folder / "maps").glob("*.npz")}
    assert 10 <= len(finished) < 100
    result = _run(args, base["env"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(summary["tiles_already_done"]) == sorted(n[:-5] for n in finished)
    assert len(summary["tiles"]) == 100 - len(finished)
    assert {n: m for n, m in _mtimes(state).items() if n in finished} == finished
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "maps").glob("*.npz")}
    assert all(after[f"{n[:-5]}.npz"] == maps_before[f"{n[:-5]}.npz"] for n in finished)
    assert not list((folder / "maps").glob("*.tmp*"))  # no half-written tile left behind
    reference, resumed = _maps(load_run[0]), _maps(folder)
    assert resumed.keys() == reference.keys()
    for tile, (classes, confidence) in reference.items():
        np.testing.assert_array_equal(resumed[tile][0], classes, err_msg=tile)
        np.testing.assert_array_equal(resumed[tile][1], confidence, err_msg=tile)
    print(f"\ncrash predict: killed with {len(finished)}/100 tiles done; re-run did "
          f"{len(summary['tiles'])}; maps equal to the uninterrupted run")  # fmt: skip
    # a map deleted behind predict's back is redone, though its marker still matches
    lost = sorted((folder / "maps").glob("*.npz"))[0]
    lost.unlink()
    result = _run(args, base["env"])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [t["tile"] for t in summary["tiles"]] == [lost.stem]
    assert len(summary["tiles_already_done"]) == 99
    np.testing.assert_array_equal(_maps(folder)[lost.stem][0], reference[lost.stem][0])
