"""`pivotmap stack` for real: PostgreSQL, Prefect and MLflow servers on it, S3 (moto), Dask, a
Prefect worker per pool; infra/prefect.yaml's map-production deployment run end to end on it
(products on S3, the model on the MLflow server as @champion, the run and its artifacts in the
Prefect API); then `down`, and no process is left. The fast tests check the refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pivotmap.flows.alerts import WEBHOOK_ENV
from pivotmap.flows.stack import main, read_env_file, work_pools
from pivotmap.tasks.pgstac_server import pg_bin_dir
from tests.small_runs import generate_small_region, write_small_config

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
BUCKET = "pivotmap-stack"
NAME = "stack"  # the run config's name: artifacts are `run-report-stack`, ...
WEBHOOK_TOKEN = "t0k3n-in-the-url"  # a webhook URL is a secret: no alert may repeat it

needs_postgres = pytest.mark.skipif(
    pg_bin_dir(postgis=False) is None,
    reason="PostgreSQL's server not installed (apt-get install postgresql)",
)


def _stack(*args: str, timeout: float = 300, env: dict | None = None) -> tuple[int, dict, str]:
    """`python -m pivotmap.flows.stack ARGS --json` as the operator runs it: (code, JSON, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "pivotmap.flows.stack", *args, "--json"], cwd=REPO,
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return done.returncode, summary, done.stderr


def _all_pids(folder: Path) -> set[int]:
    """Every process the stack's state names, with their descendants now, and PostgreSQL's."""
    import psutil

    state = json.loads((folder / "stack.json").read_text())
    pids = set()
    for service in state["services"]:
        pids |= {service["pid"], *service["pids"]}
        try:
            pids |= {p.pid for p in psutil.Process(service["pid"]).children(recursive=True)}
        except psutil.Error:
            pass
    pg = int((Path(state["postgres_folder"]) / "pgdata" / "postmaster.pid").read_text().split()[0])
    pids |= {pg} | {p.pid for p in psutil.Process(pg).children(recursive=True)}
    return pids


def _alive(pids: set[int]) -> set[int]:
    import psutil

    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            pass
    return out


# ---------------------------------------------------------------------------- fast: refusals


def test_the_pools_are_those_of_prefect_yaml():
    assert work_pools(REPO / "infra" / "prefect.yaml") == ["cpu", "gpu"]


def test_a_port_in_use_is_one_clear_line_and_nothing_starts(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["up", "--dir", str(tmp_path / "s"), "--prefect-port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [
        f"pivotmap stack: error: port {port} on 127.0.0.1 (prefect-server) is in use: give "
        "another with --prefect-port or leave it out for a free one"
    ]
    assert not (tmp_path / "s" / "stack.json").exists()


def test_a_checkout_without_prefect_yaml_is_refused(tmp_path, capsys):
    assert main(["up", "--dir", str(tmp_path / "s"), "--repo", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"pivotmap stack: error: --repo {tmp_path} holds no infra/prefect.yaml: give the "
        "pivotmap checkout whose configs the Prefect workers run"
    )
    assert main(["up", "--dir", str(tmp_path / "s"), "--dask-workers", "0"]) == 1
    assert "--dask-workers 0: give 1 or more" in capsys.readouterr().err


def test_down_and_status_without_a_stack(tmp_path, capsys):
    assert main(["down", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"pivotmap stack: error: no stack in {tmp_path} (no stack.json): nothing to stop"
    )
    assert main(["status", "--dir", str(tmp_path), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["running"] is False


# ---------------------------------------------------------------------------- the real stack


class _Receiver(BaseHTTPRequestHandler):
    """The operator's webhook: keeps every POST (path, body)."""

    posts: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.posts.append((self.path, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/{WEBHOOK_TOKEN}", _Receiver.posts
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """`pivotmap stack up` (one Dask worker: a 2-core machine) with an alert webhook; (folder,
    env file, summary)."""
    folder = tmp_path_factory.mktemp("stack") / "state"
    started = time.monotonic()
    code, summary, err = _stack(
        "up", "--dir", str(folder), "--dask-workers", "1", env={WEBHOOK_ENV: receiver[0]}
    )
    assert code == 0, err
    summary["wall_s"] = round(time.monotonic() - started, 1)
    try:
        yield folder, read_env_file(folder / "stack.env"), summary
    finally:
        if (folder / "stack.json").exists() and json.loads((folder / "stack.json").read_text()).get(
            "services"
        ):
            _stack("down", "--dir", str(folder), "--purge")


def _client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory):
    """map-production deployed from infra/prefect.yaml onto the stack (as its runbook says)."""
    folder, env, _ = stack
    home = tmp_path_factory.mktemp("prefect-cli-home")
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    cli_env |= env | {
        "PREFECT_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    started = time.monotonic()
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
         "--name", "map-production"],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return time.monotonic() - started


def _s3(env: dict):
    import boto3

    return boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )  # fmt: skip


def _wait_final(client, run_id, timeout: float, folder: Path):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"{run.state}\n{_logs(folder)}"
        time.sleep(2)


def _deployment_id(client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    (deployment,) = client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["map-production"]))
    )
    return deployment.id


def stack_config(env: dict[str, str], region: Path, file_name: str, name: str = NAME) -> Path:
    """A run config `name` of a 2 × 2-tile region generated under `region`, on the stack's
    MLflow server and Dask scheduler."""
    generate_small_region(region / "data")
    layer = {
        "name": name,
        "mlflow": {"tracking_uri": env["MLFLOW_TRACKING_URI"]},
        "dask": {"address": env["PIVOTMAP_DASK_ADDRESS"]},
        "concept": {"enabled": False, "prompts": []},
    }
    return write_small_config(region, file_name, region / "unused.db", layer)


@pytest.fixture(scope="module")
def production_run(stack, deployed, tmp_path_factory):
    """The map-production deployment on a 2 × 2-tile generated region: run folder on the stack's
    S3, model trained and registered on its MLflow server, tile jobs on its Dask scheduler."""
    folder, env, _ = stack
    config = stack_config(env, tmp_path_factory.mktemp("region"), "stack.yaml")
    _s3(env).create_bucket(Bucket=BUCKET)
    started = time.monotonic()
    with _client(env["PREFECT_API_URL"]) as client:
        run = client.create_flow_run_from_deployment(
            _deployment_id(client),
            parameters={"config_path": str(config), "out_dir": f"s3://{BUCKET}/run",
                        "train": True, "overrides": {}},
        )  # fmt: skip
        run = _wait_final(client, run.id, 400, folder)
    return run, time.monotonic() - started


def _logs(folder: Path, tail: int = 3000) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}"
        for log in sorted((folder / "logs").glob("*.log"))
    )


@needs_postgres
@pytest.mark.deploy
@pytest.mark.slow
def test_map_production_runs_end_to_end_on_the_stack(stack, deployed, production_run):
    import mlflow

    folder, env, summary = stack
    run, seconds = production_run
    print(f"stack up {summary['wall_s']} s, deploy {deployed:.1f} s, run {seconds:.1f} s")
    assert run.state.is_completed(), f"{run.state}\n{_logs(folder)}"
    assert set(summary["services"]) >= {"prefect-server", "mlflow", "s3", "dask-scheduler"}
    s3 = _s3(env)
    # the products on S3: the catalogue and the version's COGs
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="run/products/")["Contents"]]
    assert "run/products/catalog.json" in keys
    assert any(k.endswith("mosaic_class.tif") for k in keys), keys
    # the model on the MLflow server (PostgreSQL store), @champion, its files in the S3 bucket
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(f"pivotmap-{NAME}", "champion")
    assert champion.version == "1"
    # (pivotmap logs artifacts under the run folder, `mlflow/artifacts`: here on S3 too)
    assert client.get_run(champion.run_id).info.artifact_uri.startswith(f"s3://{BUCKET}/run/")
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="run/mlflow/artifacts/")
    stored = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith("MLmodel") for k in stored), stored
    # the run, its subflows and its artifacts in the Prefect API (on PostgreSQL)
    with _client(env["PREFECT_API_URL"]) as api:
        runs = api.read_flow_runs()
        artifacts = api.read_artifacts()
    flows = {r.name: r for r in runs}
    durations = {
        r.flow_id.hex[:6] + " " + r.name: round(r.total_run_time.total_seconds(), 1) for r in runs
    }
    print(f"flow runs (seconds): {durations}")
    assert len(runs) >= 7, [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs), {r.name: r.state.type for r in runs}
    keys = {a.key for a in artifacts if a.key}
    assert {f"run-report-{NAME}", f"tile-status-{NAME}", f"class-areas-{NAME}"} <= keys, keys
    assert flows and run.work_pool_name == "gpu"


@needs_postgres
@pytest.mark.deploy
@pytest.mark.slow
def test_a_failed_deployed_run_posts_an_alert(stack, deployed, production_run, receiver):
    folder, env, summary = stack
    _, posts = receiver
    assert summary["alerts"]["webhook_host"] == "127.0.0.1"
    assert posts == []  # the completed production run sent nothing
    with _client(env["PREFECT_API_URL"]) as client:
        run = client.create_flow_run_from_deployment(
            _deployment_id(client),
            parameters={"config_path": "infra/configs/no-such-region.yaml", "out_dir": "out/x"},
        )
        deadline = time.monotonic() + 120
        while not (run.state and run.state.is_final()) or not posts:
            assert time.monotonic() < deadline, f"{run.state}: no alert\n{_logs(folder)}"
            time.sleep(1)
            run = client.read_flow_run(run.id)
    assert run.state.is_failed()
    time.sleep(2)  # one alert, not one per subflow or retry
    assert len(posts) == 1, posts
    path, body = posts[0]
    assert path == f"/hooks/{WEBHOOK_TOKEN}"
    alert = json.loads(body)
    assert {k: alert[k] for k in ("source", "flow", "deployment", "state")} == {
        "source": "pivotmap", "flow": "map-production", "deployment": "map-production",
        "state": "Failed",
    }  # fmt: skip
    assert alert["flow_run_id"] == str(run.id) and alert["flow_run"] == run.name
    assert alert["url"] == f"{env['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{run.id}"
    assert "no-such-region.yaml" in alert["message"]
    text = body.decode()
    assert WEBHOOK_TOKEN not in text and env["AWS_SECRET_ACCESS_KEY"] not in text


@needs_postgres
@pytest.mark.deploy
@pytest.mark.slow
def test_status_then_down_leaves_no_process(stack, production_run):
    folder, _, _ = stack
    code, status, err = _stack("status", "--dir", str(folder))
    assert code == 0 and status["ok"], err
    assert {n for n, s in status["services"].items() if s["running"]} >= {
        "postgres", "s3", "prefect-server", "mlflow", "dask-scheduler", "dask-worker-1",
        "prefect-worker-cpu", "prefect-worker-gpu",
    }  # fmt: skip
    pids = _all_pids(folder)
    assert len(pids) > 10
    started = time.monotonic()
    code, down, err = _stack("down", "--dir", str(folder))
    assert code == 0, err
    print(f"stack down {time.monotonic() - started:.1f} s, {len(pids)} processes, {down}")
    assert "postgres" in down["stopped"]
    assert not _alive(pids)
    assert not (folder / "stack.env").exists()
    code, status, _ = _stack("status", "--dir", str(folder))
    assert code == 3 and not status["running"]
    # the databases are kept for the next `up`; --purge deletes them with the state folder
    postgres = Path(json.loads((folder / "stack.json").read_text())["postgres_folder"])
    assert (postgres / "pgdata" / "PG_VERSION").is_file()
    code, _, err = _stack("down", "--dir", str(folder), "--purge")
    assert code == 0, err
    assert not folder.exists() and not postgres.exists()
