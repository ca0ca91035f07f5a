"""infra/prefect.yaml for real: a `prefect server`, the work pools, `prefect deploy --all`, a
process worker, and the demo deployment run to completion on a tiny synthetic region."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pivotmap.config import RunConfig
from pivotmap.runtime import CONCURRENCY_LIMITS
from tests.procs import stop_group

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def deployed(prefect_api_server, tmp_path_factory):
    """Work pools created and every deployment of infra/prefect.yaml deployed; a cpu worker."""
    url, env = prefect_api_server
    for pool in ("cpu", "gpu"):
        _prefect(env, "work-pool", "create", pool, "--type", "process", "--overwrite")
    started = time.monotonic()
    _prefect(env, "deploy", "--prefect-file", "infra/prefect.yaml", "--all", timeout=300)
    deploy_s = time.monotonic() - started
    logs = tmp_path_factory.mktemp("worker")
    worker_env = {**env, "PIVOTMAP_REPO": str(REPO)}
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


def test_every_deployment_is_registered(deployed):
    from prefect.client.schemas.filters import DeploymentFilter

    url, *_ = deployed
    with _client(url) as client:
        found = {d.name: d for d in client.read_deployments(deployment_filter=DeploymentFilter())}
    assert set(found) == {"daily-update", "train", "map-production", "demo"}
    assert found["daily-update"].work_pool_name == "cpu"
    assert found["map-production"].work_pool_name == "gpu"
    assert [s.schedule.cron for s in found["daily-update"].schedules] == ["0 4 * * *"]
    assert found["train"].schedules == []
    assert found["demo"].work_queue_name == "demo"
    with _client(url) as client:
        limits = {c.name: c.limit for c in client.read_global_concurrency_limits()}
    # deploying created the shared request limits; each non-demo deployment runs one at a time
    per_deployment = {k: v for k, v in limits.items() if k.startswith("deployment:")}
    assert {k: v for k, v in limits.items() if k not in per_deployment} == CONCURRENCY_LIMITS
    assert sorted(per_deployment.values()) == [1, 1, 1]


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


def test_the_run_leaves_its_artifacts_in_the_api(demo_run, deployed):
    from prefect.client.schemas.filters import ArtifactFilter

    url, *_ = deployed
    run, out, _ = demo_run
    with _client(url) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter())
        runs = {r.id: r for r in client.read_flow_runs()}
    by_key = {a.key: a for a in artifacts if a.key}
    assert {"run-report-demo", "class-areas-demo", "tile-status-demo"} <= set(by_key)
    stage_keys = {"ingest-tiles-demo", "pivot-tiles-demo", "predict-tiles-demo", "train-demo"}
    assert {"ingest-skipped-items", *stage_keys} <= set(by_key)
    report = by_key["run-report-demo"]
    assert report.type == "markdown" and "quality-class-map.html" in report.data
    assert (out / "reports" / "quality-class-map.html").is_file()
    areas = json.loads(by_key["class-areas-demo"].data)
    assert sum(row["pixels"] for row in areas) == 64 * 64
    tiles = json.loads(by_key["tile-status-demo"].data)
    assert {row["stage"] for row in tiles} >= {"ingest-s2", "pivot", "predict"}
    progress = [a for a in artifacts if a.type == "progress"]
    assert progress and all(float(a.data) == 100.0 for a in progress)
    # every artifact belongs to the demo run or one of its subflows
    family = {run.id} | {r.id for r in runs.values() if r.parent_task_run_id is not None}
    assert all(a.flow_run_id in family for a in artifacts)


def test_status_lists_the_run_and_the_published_map(demo_run, deployed, capsys):
    from pivotmap.flows.cli import main

    url, *_ = deployed
    run, out, _ = demo_run
    assert main(["status", "--api", url, "--out", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["api"]["reachable"]
    names = {(r["flow"], r["state"]) for r in status["flow_runs"]}
    assert ("demo", "COMPLETED") in names and ("publish", "COMPLETED") in names
    assert status["products"]["current"] == status["products"]["versions"][0]["version"]


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
