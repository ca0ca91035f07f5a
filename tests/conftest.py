"""Shared fixtures: offline settings, the real data folder, one Prefect server per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pivotmap.runtime import apply_offline_defaults

apply_offline_defaults()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REALDATA = SHARED / "realdata"
FLANDERS = REALDATA / "flanders-31UDS-2018"
SCHEMAS = SHARED / "stac-schemas"

# CI must not go green on a run where nothing passed (a wrong -m, every test skipped).
_PASSED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _PASSED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run in which no test passed (all deselected or skipped) is not a green run."""
    if exitstatus == pytest.ExitCode.OK and not _PASSED and not session.config.option.collectonly:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("pivotmap: no test passed; exit status 5", red=True)


@pytest.fixture(scope="session")
def flanders() -> Path:
    if not (FLANDERS / "catalog.json").is_file():
        pytest.skip(f"real data not found at {FLANDERS}")
    return FLANDERS


@pytest.fixture(scope="session")
def schema_dir() -> Path:
    if not (SCHEMAS / "index.json").is_file():
        pytest.skip(f"STAC schemas not found at {SCHEMAS}")
    return SCHEMAS


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (each costs ~20-30 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto server); boto3 finds it through the environment."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test."""
    import re

    from pivotmap.tasks.storage import s3_client

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (own PREFECT_HOME, SQLite), for the deploy
    and status tests; yields (api_url, env for `prefect` subprocesses). Killed with its group."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.procs import stop_group

    home = tmp_path_factory.mktemp("prefect-home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log = (home / "server.log").open("wb")
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start"]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (home / "server.log").read_text()[-2000:]
                raise RuntimeError(f"prefect server did not start: {tail}")
            time.sleep(0.5)
        yield url, env
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture
def one_torch_thread():
    """Tiny batches: one torch thread is faster than two fighting over a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
