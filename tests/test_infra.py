"""What can be checked of infra/ without Docker or a cluster: the compose file's structure and
secrets, and that every deployment of prefect.yaml names a real flow with valid parameters."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pivotmap.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def _strings(node, path=()):
    """(path, value) of every string in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, str(i)))
    elif isinstance(node, str):
        yield path, node


def test_compose_has_the_production_services():
    services = _compose()["services"]
    assert {
        "prefect-server", "prefect-db", "mlflow", "mlflow-db", "s3", "dask-scheduler",
        "dask-worker-cpu", "dask-worker-gpu", "prefect-worker-cpu", "prefect-worker-gpu",
    } <= set(services)  # fmt: skip
    assert (
        "postgresql"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    assert "dask cuda worker" in services["dask-worker-gpu"]["command"]
    assert "--pool gpu" in services["prefect-worker-gpu"]["command"]
    viewer = services["viewer"]["command"]  # `pivotmap serve` reachable from outside its container
    assert viewer.startswith("pivotmap serve --catalog ") and "--host 0.0.0.0" in viewer
    assert services["viewer"]["ports"] == ["8080:8080"] and "--public-url" in viewer
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_keeps_every_secret_in_the_environment():
    secrets = 0
    for path, value in _strings(_compose()):
        if SECRET_NAME.search(path[-1]):
            assert ENV_REFERENCE.match(value), f"{'.'.join(path)} holds a literal secret"
            secrets += 1
        for userinfo in re.findall(r"://[^/@\s]+:([^/@\s]+)@", value):
            assert ENV_REFERENCE.match(userinfo), f"{'.'.join(path)}: password in a URL"
    assert secrets >= 6


def _has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.mark.skipif(not _has_docker_compose(), reason="docker compose is not installed")
def test_docker_compose_accepts_the_file():
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "MLFLOW_DB_PASSWORD": "x"}
    env.update(S3_ACCESS_KEY="x", S3_SECRET_KEY="x")
    done = subprocess.run(
        ["docker", "compose", "-f", str(INFRA / "compose.yaml"), "config", "-q"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_prefect_yaml_is_a_valid_deploy_file():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    names = [d.name for d in model.deployments]
    assert sorted(names) == ["daily-update", "demo", "map-production", "train"]
    assert {d.work_pool.name for d in model.deployments} == {"cpu", "gpu"}
    # code from the installed package (module entrypoints); the pull step only picks the folder
    assert model.pull == [{"pivotmap.flows.deploy.run_directory": {}}]
    assert all(d.entrypoint.startswith("pivotmap.flows.deploy.") for d in model.deployments)


@pytest.mark.parametrize("name", ["daily-update", "train", "map-production", "demo"])
def test_each_deployment_names_a_flow_and_valid_parameters(name, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)  # entrypoints and config paths are relative to the checkout
    deployment = next(d for d in _prefect_yaml()["deployments"] if d["name"] == name)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    params = flow.validate_parameters(deployment.get("parameters", {}))
    if "config_path" in params:
        config = load_run_config(params["config_path"], overrides=params.get("overrides"))
        assert config.name
        if deployment["work_pool"]["name"] == "gpu" and "overrides" in params:
            assert config.predict.dask == "local"  # one dask-cuda worker per GPU
    with pytest.raises(Exception, match="(?i)validation|unexpected|parameter"):
        flow.validate_parameters({**params, "no_such_parameter": 1})


def test_schedules_are_valid_crons():
    from prefect.client.schemas.schedules import CronSchedule

    crons = {}
    for deployment in _prefect_yaml()["deployments"]:
        for schedule in deployment.get("schedules", []):
            crons[deployment["name"]] = CronSchedule(
                cron=schedule["cron"], timezone=schedule["timezone"]
            )
    assert set(crons) == {"daily-update", "map-production"}
    assert crons["daily-update"].cron == "0 4 * * *"


def test_request_slot_needs_no_api_outside_a_flow_run(monkeypatch):
    from pivotmap.runtime import request_slot

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    entered = False
    with request_slot("stac-requests"):
        entered = True
    assert entered
