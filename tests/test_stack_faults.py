"""Faults on the production stack (`pivotmap stack up`), in one run of map-production: the
Prefect worker of the `gpu` pool is killed with its flow run (a node lost) once the pivot stage
is done; the crash detection of flows/alerts.py sets the silent runs Crashed within its window
(90 s after the last heartbeat) and nothing is published; a new worker started for the pool runs
a re-run of the same deployment with the same parameters, during which PostgreSQL (Prefect's
and MLflow's database) restarts; the re-run resumes (the pivot tiles are skipped, not
recomputed), completes and publishes a whole catalogue; then `down` leaves no process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pivotmap.flows.alerts import (
    CRASH_AFTER_SECONDS,
    CRASH_AUTOMATION,
    HEARTBEAT_ENV,
    HEARTBEAT_SECONDS,
)
from pivotmap.flows.stack import main, read_env_file
from tests.test_stack import (
    PREFECT,
    REPO,
    _alive,
    _all_pids,
    _client,
    _deployment_id,
    _logs,
    _s3,
    _stack,
    _wait_final,
    deployed,  # noqa: F401  (a fixture: map-production deployed onto `stack` below)
    needs_postgres,
    stack_config,
)

BUCKET = "pivotmap-faults"
NAME = "faults"


def test_a_crash_window_shorter_than_two_heartbeats_is_refused(tmp_path, capsys):
    assert main(["up", "--dir", str(tmp_path / "s"), "--crash-after", "30"]) == 1
    assert capsys.readouterr().err.strip() == (
        "pivotmap stack: error: --crash-after: crash detection within 30 s: give at least 60 s "
        "(two heartbeats of 30 s, Prefect's shortest interval)"
    )
    assert not (tmp_path / "s" / "stack.json").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`pivotmap stack up` without alerts; (folder, env of stack.env, summary). Stopped at the
    end whatever happened."""
    folder = tmp_path_factory.mktemp("stack-faults") / "state"
    code, summary, err = _stack("up", "--dir", str(folder), "--dask-workers", "1")
    assert code == 0, err
    try:
        yield folder, read_env_file(folder / "stack.env"), summary
    finally:
        state = folder / "stack.json"
        if state.exists() and json.loads(state.read_text()).get("services"):
            _stack("down", "--dir", str(folder), "--purge")


@pytest.fixture(scope="module")
def config(stack, tmp_path_factory) -> Path:
    """A run config of a generated 2 × 2-tile region on the stack's MLflow server and Dask, and
    the S3 bucket of the runs' folders."""
    _, env, _ = stack
    _s3(env).create_bucket(Bucket=BUCKET)  # the runs' folders
    return stack_config(env, tmp_path_factory.mktemp("faults-region"), "faults.yaml", NAME)


def _parameters(config: Path, run: str) -> dict:
    return {"config_path": str(config), "out_dir": f"s3://{BUCKET}/{run}", "train": True,
            "overrides": {}}  # fmt: skip


def _flow_runs(client, flow: str | None = None) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = FlowFilter(name=FlowFilterName(any_=[flow])) if flow else None
    return list(client.read_flow_runs(flow_filter=flows))


def _postgres(folder: Path):
    from pivotmap.tasks.stack_services import StackPostgres

    state = json.loads((folder / "stack.json").read_text())
    return StackPostgres(Path(state["postgres_folder"]), state["ports"]["postgres"])


def _worker(folder: Path, pool: str) -> dict:
    state = json.loads((folder / "stack.json").read_text())
    (record,) = [s for s in state["services"] if s["name"] == f"prefect-worker-{pool}"]
    return dict(record)


def _kill_with_descendants(pid: int) -> set[int]:
    """SIGKILL a process, its descendants and their process groups (a flow run runs in a
    session of its own): what a lost node does to them."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pids = {p.pid for p in procs}
    for group in {os.getpgid(p) for p in pids}:
        os.killpg(group, signal.SIGKILL)
    return pids


def _start_worker(folder: Path, env: dict[str, str], pool: str) -> subprocess.Popen:
    """`prefect worker start --pool POOL` as an operator starts a replacement worker: the
    stack's environment (stack.env, with its heartbeat frequency) and PIVOTMAP_REPO."""
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    worker_env |= env | {
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PIVOTMAP_REPO": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (folder / "logs" / f"prefect-worker-{pool}-replacement.log").open("ab")
    return subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", pool, "--type", "process",
         "--name", f"replacement-{pool}"],
        cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _stop_group(proc: subprocess.Popen) -> None:
    import psutil

    try:
        pids = {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
    except psutil.Error:
        pids = {proc.pid}
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except OSError:
            pass
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
        proc.wait(5)


@needs_postgres
@pytest.mark.deploy
@pytest.mark.faults
@pytest.mark.slow
def test_a_killed_worker_crashes_the_run_and_a_new_worker_resumes_it(stack, deployed, config):
    folder, env, summary = stack
    timings: dict[str, float] = {"stack_up": summary["seconds"], "deploy": round(deployed, 1)}
    assert env[HEARTBEAT_ENV] == "30"
    assert summary["crash_detection"]["automation"] == CRASH_AUTOMATION
    parameters = _parameters(config, "run")
    with _client(env["PREFECT_API_URL"]) as client:
        deployment = _deployment_id(client)
        assert [a.name for a in client.read_automations_by_name(CRASH_AUTOMATION)]
        started = time.monotonic()
        first = client.create_flow_run_from_deployment(deployment, parameters=parameters)
        # the fixed point: the pivot subflow completed (the tiles of the cube are marked done)
        deadline = time.monotonic() + 300
        while not any(r.state.is_completed() for r in _flow_runs(client, "pivot")):
            run = client.read_flow_run(first.id)
            assert not run.state.is_final(), f"{run.state}\n{_logs(folder)}"
            assert time.monotonic() < deadline, f"pivot not done\n{_logs(folder)}"
            time.sleep(1)
        timings["to_pivot_done"] = round(time.monotonic() - started, 1)
        killed = _kill_with_descendants(_worker(folder, "gpu")["pid"])
        assert len(killed) >= 2  # the worker and the flow run's process
        killed_at = time.monotonic()
        time.sleep(1)
        assert not _alive(killed)
        assert client.read_flow_run(first.id).state.is_running()  # nobody reported it
        # the crash detection: Crashed within its window of the last heartbeat (≤ 30 s before)
        crashed = _wait_final(client, first.id, CRASH_AFTER_SECONDS + 60, folder)
        timings["kill_to_crashed"] = round(time.monotonic() - killed_at, 1)
        assert crashed.state.is_crashed(), crashed.state
        assert "no heartbeat" in crashed.state.message, crashed.state.message
        assert timings["kill_to_crashed"] <= CRASH_AFTER_SECONDS + 30, timings
        # its subflow that ran when the process died is Crashed too: nothing is left Running.
        # The subflow beats on its own 30 s clock, so its last heartbeat may come up to one
        # interval after its parent's: its window closes up to HEARTBEAT_SECONDS later.
        deadline = time.monotonic() + HEARTBEAT_SECONDS + 30
        while running := [r.name for r in _flow_runs(client) if r.state.is_running()]:
            assert time.monotonic() < deadline, f"still Running: {running}"
            time.sleep(2)
        # nothing published by the killed run
        products = _s3(env).list_objects_v2(Bucket=BUCKET, Prefix="run/products/")
        assert not products.get("Contents"), products["Contents"]
        # a new worker for the pool, the same deployment and parameters: resumes, completes
        replacement = _start_worker(folder, env, "gpu")
        try:
            started = time.monotonic()
            trained = {r.id for r in _flow_runs(client, "train")}
            second = client.create_flow_run_from_deployment(deployment, parameters=parameters)
            # PostgreSQL (Prefect's and MLflow's database) restarted while the re-run trains
            deadline = time.monotonic() + 300
            while not [r for r in _flow_runs(client, "train") if r.id not in trained]:
                assert not client.read_flow_run(second.id).state.is_final(), _logs(folder)
                assert time.monotonic() < deadline, f"no train stage\n{_logs(folder)}"
                time.sleep(0.5)
            restart = time.monotonic()
            _postgres(folder).restart()
            timings["postgres_restart"] = round(time.monotonic() - restart, 1)
            second = _wait_final(client, second.id, 400, folder)
            timings["rerun"] = round(time.monotonic() - started, 1)
            assert second.state.is_completed(), f"{second.state}\n{_logs(folder)}"
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            (tiles,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"tile-status-{NAME}"]))
            )  # the killed run never got to its report: this is the re-run's
        finally:
            _stop_group(replacement)
    print(f"timings (s): {timings}")
    # the pivot cube was not recomputed: its 4 tiles skipped (done before the kill)
    pivot_row = next(line for line in tiles.data.splitlines() if line.startswith("| pivot |"))
    assert pivot_row.replace(" ", "") == "|pivot|4|0|4|0|0|", tiles.data
    keys = [o["Key"] for o in _s3(env).list_objects_v2(Bucket=BUCKET, Prefix="run/products/")[
        "Contents"]]  # fmt: skip
    assert "run/products/catalog.json" in keys
    assert _missing(_s3(env), "run/products/catalog.json", set(keys)) == []


def _missing(s3, key: str, keys: set[str]) -> list[str]:
    """The S3 keys that the STAC document `key` links to (children, items, assets, followed
    down) and that are not in `keys`."""
    import posixpath
    from urllib.parse import urlsplit

    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    folder = posixpath.dirname(key)
    hrefs = [link["href"] for link in doc.get("links", []) if link["rel"] in ("child", "item")]
    assets = [a["href"] for a in doc.get("assets", {}).values()]
    missing = []
    for href in hrefs + assets:
        if urlsplit(href).scheme:  # a URL (or the model's `models:/…`), not a key here
            continue
        target = posixpath.normpath(posixpath.join(folder, href))
        if target not in keys:
            missing.append(target)
        elif href in hrefs:
            missing += _missing(s3, target, keys)
    return missing


@needs_postgres
@pytest.mark.deploy
@pytest.mark.faults
@pytest.mark.slow
def test_down_leaves_no_process(stack):
    folder, _, _ = stack
    pids = _all_pids(folder)
    code, down, err = _stack("down", "--dir", str(folder), "--purge")
    assert code == 0, err
    assert not _alive(pids)
    assert not folder.exists()
