"""infra/prefect.yaml for real: a fresh `prefect server`, the README's one deploy command (work
pools created, `prefect deploy --all`, schedules paused), a process worker started outside any
checkout without PIVOTMAP_REPO, and the demo deployment run to completion on a tiny region."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest

from pivotmap.config import RunConfig
from pivotmap.runtime import CONCURRENCY_LIMITS
from tests.procs import stop_group

# Tests that run a real server are marked `deploy` and `slow`; the pure checks of
# flows/deploy.py (at the end) are in the fast tier.

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")

# One 64 px tile, six months, a few epochs: the chain end to end in well under a minute.
FAST = {
    "train": {"epochs": 3, "pretrain_epochs": 0, "baseline_trees": 0},
    "predict": {"dask": "none"},
    "explain": {"enabled": False},
}
DEMO_PARAMETERS = {"tiles": 1, "tile_size": 64, "start": "2023-03-01", "end": "2023-08-31"}


def _prefect(env: dict, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


DEPLOY = [sys.executable, "-m", "pivotmap.flows.deploy"]


def _deploy(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [*DEPLOY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"deploy {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def deployed(prefect_api_server, tmp_path_factory):
    """The README's deploy command on a fresh server (no work pool exists); a cpu worker
    started in an empty folder, without PIVOTMAP_REPO: the code comes from the installed
    package."""
    url, env = prefect_api_server
    started = time.monotonic()
    printed = _deploy(env, "deploy")
    deploy_s = time.monotonic() - started
    assert "work pool cpu: created" in printed and "work pool gpu: created" in printed
    assert "schedule map-production 0 2 1 1,4,7,10 *: paused" in printed
    logs = tmp_path_factory.mktemp("worker")
    worker_env = {k: v for k, v in env.items() if k != "PIVOTMAP_REPO"}
    with (logs / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "cpu", "--work-queue", "demo", "--limit", "1"],
            cwd=logs, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield url, env, logs / "worker.log", deploy_s
        finally:
            stop_group(worker)


def _client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


@pytest.fixture(scope="module")
def demo_run(deployed, tmp_path_factory):
    """The demo deployment, run by the worker into a fresh folder; (flow run, out dir, seconds)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    url, env, worker_log, _ = deployed
    out = tmp_path_factory.mktemp("demo-deployment")
    overrides = {k: v for k, v in FAST.items() if k in RunConfig.model_fields}
    started = time.monotonic()
    with _client(url) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["demo"]))
        )
        assert len(deployments) == 1
        run = client.create_flow_run_from_deployment(
            deployments[0].id,
            parameters={"out_dir": str(out), **DEMO_PARAMETERS, "overrides": overrides},
        )
        deadline = time.monotonic() + 300
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
            time.sleep(2)
    return run, out, time.monotonic() - started


@pytest.mark.deploy
@pytest.mark.slow
def test_every_deployment_is_registered(deployed):
    from prefect.client.schemas.filters import DeploymentFilter

    url, *_ = deployed
    with _client(url) as client:
        found = {d.name: d for d in client.read_deployments(deployment_filter=DeploymentFilter())}
    assert set(found) == {"daily-update", "train", "map-production", "demo"}
    assert found["daily-update"].work_pool_name == "cpu"
    with _client(url) as client:  # created like `prefect work-pool create --type process`
        template = client.read_work_pool("cpu").base_job_template
    assert {"env", "working_dir"} <= set(template["variables"]["properties"])
    assert found["map-production"].work_pool_name == "gpu"
    assert [s.schedule.cron for s in found["daily-update"].schedules] == ["0 4 * * *"]
    # production schedules start paused: deploying starts no run (the schedule test turns them on)
    assert not any(s.active for d in found.values() for s in d.schedules)
    assert found["map-production"].entrypoint == "pivotmap.flows.deploy.map_production"
    assert found["train"].schedules == []
    assert found["demo"].work_queue_name == "demo"
    with _client(url) as client:
        limits = {c.name: c.limit for c in client.read_global_concurrency_limits()}
    # deploying created the shared request limits; each non-demo deployment runs one at a time
    per_deployment = {k: v for k, v in limits.items() if k.startswith("deployment:")}
    assert {k: v for k, v in limits.items() if k not in per_deployment} == CONCURRENCY_LIMITS
    assert sorted(per_deployment.values()) == [1, 1, 1]


@pytest.mark.deploy
@pytest.mark.slow
def test_demo_deployment_runs_to_completion_with_products(demo_run, deployed):
    from rio_cogeo.cogeo import cog_validate

    run, out, seconds = demo_run
    print(f"demo deployment: {seconds:.1f} s from scheduling to a final state")
    _, _, worker_log, deploy_s = deployed
    print(f"prefect deploy --all: {deploy_s:.1f} s")
    assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-4000:]}"
    catalog = json.loads((out / "products" / "catalog.json").read_text())
    child = next(link["href"] for link in catalog["links"] if link["rel"] == "child")
    version_dir = (out / "products" / child).parent
    cogs = sorted(version_dir.rglob("*.tif"))
    # class, confidence, the demo's concept map ("a lake": text alignment ran in the worker's
    # flow run) and the mosaic
    assert sorted(p.name if p.parent == version_dir else p.name.split("_", 1)[1] for p in cogs) == [
        "class.tif", "concept-a-lake.tif", "confidence.tif", "mosaic_class.tif"
    ]  # fmt: skip
    assert all(cog_validate(str(p))[0] for p in cogs)
    assert (out / "reports" / "run-report.md").is_file()


@pytest.mark.deploy
@pytest.mark.slow
def test_the_run_leaves_its_artifacts_in_the_api(demo_run, deployed):
    from prefect.client.schemas.filters import ArtifactFilter

    url, *_ = deployed
    run, out, _ = demo_run
    with _client(url) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter())
        runs = {r.id: r for r in client.read_flow_runs()}
        latest = {a.key: a for a in client.read_latest_artifacts()}
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"run-report-demo", "class-areas-demo", "tile-status-demo"} <= set(by_key)
    stage_keys = {"ingest-tiles-demo", "pivot-tiles-demo", "predict-tiles-demo", "train-demo"}
    assert {"ingest-skipped-items", *stage_keys} <= set(by_key)
    report = by_key["run-report-demo"]
    assert report.type == "markdown" and "quality-class-map.html" in report.data
    assert (out / "reports" / "quality-class-map.html").is_file()
    areas = json.loads(by_key["class-areas-demo"].data)
    assert sum(row["pixels"] for row in areas) == 64 * 64
    tiles = by_key["tile-status-demo"]
    assert (
        tiles.type == "markdown" and "| stage | tiles | written | skipped | failed |" in tiles.data
    )
    assert "| ingest-s2 | 1 | 1 | 0 | 0 | 0 |" in tiles.data and "| predict | 1 | 1 |" in tiles.data
    # the parent run's stages, as they ran; per-class F1 under class names
    stages = latest["stages-demo"].data  # updated as each stage ended: a version each
    assert "| 1 | ingest | done |" in stages and "| publish | done |" in stages
    assert "waiting" not in stages and "running" not in stages
    names = [row["name"] for row in areas]
    assert sum(f"| {name} | " in report.data for name in names) >= 2, report.data
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress and all(float(a.data) == 100.0 for a in progress)
    assert any((a.description or "").startswith("demo: all stages done") for a in progress)
    # every artifact belongs to the demo run or one of its subflows
    family = {run.id} | {r.id for r in runs.values() if r.parent_task_run_id is not None}
    assert all(a.flow_run_id in family for a in artifacts)


@pytest.mark.deploy
@pytest.mark.slow
def test_status_lists_the_run_and_the_published_map(demo_run, deployed, capsys):
    from datetime import datetime, timedelta

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.states import Scheduled

    from pivotmap.flows.cli import main

    url, *_ = deployed
    run, out, _ = demo_run
    with _client(url) as client:  # a run waiting for tomorrow (no gpu worker takes it)
        train = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"]))
        )[0]
        later = datetime.now(UTC) + timedelta(days=1)
        waiting = client.create_flow_run_from_deployment(
            train.id, state=Scheduled(scheduled_time=later)
        )
    assert main(["status", "--api", url, "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    status = json.loads(captured.out.strip().splitlines()[-1])
    assert status["api"]["reachable"]
    names = {(r["flow"], r["state"]) for r in status["flow_runs"]}
    assert ("demo", "COMPLETED") in names and ("publish", "COMPLETED") in names
    assert all(r["state"] != "SCHEDULED" for r in status["flow_runs"])  # recent runs first
    assert [r["id"] for r in status["scheduled_runs"]] == [str(waiting.id)]
    text = captured.err
    assert (
        text.index("Recent flow runs")
        < text.index("Scheduled flow runs")
        < text.index(str(waiting.name))
    )
    assert status["products"]["current"] == status["products"]["versions"][0]["version"]


@pytest.mark.deploy
@pytest.mark.slow
def test_stac_and_s3_requests_take_slots_of_the_global_limits(deployed):
    from prefect import flow
    from prefect.concurrency.services import ConcurrencySlotAcquisitionService
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pivotmap.runtime import request_slot

    url, *_ = deployed
    seen = {}

    def active(name: str) -> int:
        with _client(url) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    @flow(name="slot-probe")
    def probe() -> None:
        with request_slot("s3-requests"):
            seen["inside"] = active("s3-requests")
        with request_slot("no-such-limit"):  # not created: the request is not held up
            seen["unlimited"] = True

    # Prefect keeps one slot-acquisition service per set of limit names, bound to the API it
    # first talked to: an earlier test's flows (a run folder on S3) used the session's server.
    ConcurrencySlotAcquisitionService.drain_all(timeout=5)
    with temporary_settings({PREFECT_API_URL: url}):
        probe()
        APILogWorker.drain_all(timeout=5)
        ConcurrencySlotAcquisitionService.drain_all(timeout=5)  # nor leave one bound to it
    assert seen == {"inside": 1, "unlimited": True}
    assert active("s3-requests") == 0


@pytest.mark.deploy
@pytest.mark.slow
def test_schedules_start_only_when_asked_and_survive_a_redeploy(deployed):
    url, env, *_ = deployed

    def active() -> dict[str, list[bool]]:
        with _client(url) as client:
            return {d.name: [s.active for s in d.schedules] for d in client.read_deployments()}

    assert active()["map-production"] == [False]
    printed = _deploy(env, "schedules", "--active")
    assert "schedule daily-update 0 4 * * *: ACTIVE" in printed
    assert active()["map-production"] == [True] and active()["daily-update"] == [True]
    printed = _deploy(env, "deploy")  # a code update: running schedules are not paused
    assert "work pool cpu: exists" in printed
    assert active()["map-production"] == [True] and active()["train"] == []
    _deploy(env, "schedules", "--paused")
    assert active()["daily-update"] == [False]


def test_relative_paths_without_a_folder_are_refused_with_what_to_do(monkeypatch):
    from pivotmap.flows import deploy

    monkeypatch.delenv("PIVOTMAP_REPO", raising=False)
    monkeypatch.setattr(deploy, "installed_checkout", lambda: None)  # an installed image
    assert deploy.resolve_path("/runs/fr", "out_dir") == "/runs/fr"
    assert deploy.resolve_path("s3://maps/fr", "out_dir") == "s3://maps/fr"
    assert deploy.run_directory() == {}
    with pytest.raises(ValueError, match=r"out_dir='out/x' is a relative path.*PIVOTMAP_REPO"):
        deploy.resolve_path("out/x", "out_dir")
    monkeypatch.setenv("PIVOTMAP_REPO", str(REPO))
    assert deploy.resolve_path("infra/configs/demo.yaml", "config_path") == str(
        REPO / "infra/configs/demo.yaml"
    )
    monkeypatch.setenv("PIVOTMAP_REPO", str(REPO / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match="PIVOTMAP_REPO=.*no-such-folder is not a folder"):
        deploy.run_directory()


def test_deploying_without_a_prefect_api_is_refused(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pivotmap.flows.deploy import main

    with temporary_settings({PREFECT_API_URL: None}):
        assert main(["deploy"]) == 1
    err = capsys.readouterr().err
    assert "deploy: error: no Prefect API to deploy to: set PREFECT_API_URL" in err


def test_the_pools_to_create_are_the_ones_the_deployments_name():
    from pivotmap.flows.deploy import deploy_text, pool_names

    assert pool_names(REPO / "infra" / "prefect.yaml") == ["cpu", "gpu"]
    text = deploy_text({
        "api": "http://127.0.0.1:4200/api", "work_pools": {"cpu": "created", "gpu": "exists"},
        "deployments": ["daily-update"], "schedules": [("daily-update", "daily-0400", "0 4 * * *", False)],
    })  # fmt: skip
    assert "work pool cpu: created" in text and "schedule daily-update 0 4 * * *: paused" in text
    assert "schedules --active" in text


def test_a_deployed_run_checks_its_inputs_before_any_stage(tmp_path):
    """Deployed flows run the CLI's pre-flight checks first: a missing catalogue fails the run in
    seconds, naming the check, before ingest writes anything."""
    from pivotmap.flows.check import ChecksFailed
    from pivotmap.flows.deploy import map_production, update

    config = tmp_path / "configs" / "demo.yaml"  # its ../../demo-out paths lead nowhere here
    config.parent.mkdir()
    config.write_text((REPO / "infra" / "configs" / "demo.yaml").read_text())
    out = tmp_path / "run"
    for flow_fn in (map_production.fn, update.fn):
        with pytest.raises(ChecksFailed, match=r"demo \(.*\) cannot start: check catalogue"):
            flow_fn(str(config), str(out))
    assert not (out / "cube").exists() and not (out / "state").exists()
