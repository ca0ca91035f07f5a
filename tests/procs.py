"""Stopping the servers and workers that tests start in their own process groups, and a Dask
cluster of separate processes started like production."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session=True), SIGKILL it
    if it has not exited after `timeout` seconds, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_groups(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """`stop_group` for several at once: SIGTERM every group first, so they wind down together."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        stop_group(proc, timeout)


class ProcessCluster:
    """A Dask cluster started as production starts one: a `dask scheduler` and `dask worker`
    processes on 127.0.0.1 (each in its own process group and folder), connected through a
    scheduler file. Workers get `env` (storage endpoint and credentials) and nothing else of
    the driver's: no shared folder, no client-side configuration."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.scheduler_file = folder / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}  # by worker name
        self.pids: set[int] = set()  # every process started, their children included
        self._lock = threading.Lock()

    @staticmethod
    def dask_cli() -> list[str]:
        """The venv's `dask` command (`python -m dask` where the script is missing)."""
        script = Path(sys.executable).with_name("dask")
        return [str(script)] if script.is_file() else [sys.executable, "-m", "dask"]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        cwd = self.folder / name
        cwd.mkdir(parents=True, exist_ok=True)
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*self.dask_cli(), *args], cwd=cwd, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()  # the child holds its own descriptor
        self.pids.add(proc.pid)
        return proc

    def start(self, workers: int = 2, timeout: float = 120) -> ProcessCluster:
        """Scheduler, then `workers` workers; returns once all of them are registered."""
        self.scheduler = self._spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.scheduler_file), "--idle-timeout", "900"],
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._address():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{self.logs()}")
            time.sleep(0.2)
        for _ in range(workers):
            self.add_worker()
        with self.client() as client:
            client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
            self.pids |= set(client.run(os.getpid).values())
        return self

    def _address(self) -> str | None:
        try:
            return json.loads(self.scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    @property
    def address(self) -> str:
        address = self._address()
        assert address, "the scheduler has not started"
        return address

    def client(self):
        from distributed import Client

        return Client(self.address, set_as_default=False, timeout="30s")

    def add_worker(self) -> subprocess.Popen:
        """One more `dask worker` (one process, one thread, its own folder)."""
        with self._lock:
            name = f"worker-{len(self.workers) + 1}"
            proc = self._spawn(
                name,
                ["worker", "--scheduler-file", str(self.scheduler_file), "--name", name,
                 "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                 "--memory-limit", "0", "--no-dashboard", "--death-timeout", "60",
                 "--local-directory", str(self.folder / name)],
            )  # fmt: skip
            self.workers[name] = proc
            return proc

    def kill(self, proc: subprocess.Popen) -> int:
        """SIGKILL a worker's whole group (nanny and worker: a lost machine); its exit code."""
        self._remember_children()
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)

    def _remember_children(self) -> None:
        import psutil

        for proc in [self.scheduler, *self.workers.values()]:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    kids = psutil.Process(proc.pid).children(recursive=True)
                    self.pids |= {kid.pid for kid in kids}

    def alive(self) -> set[int]:
        """The processes this cluster started that still run (zombies do not count)."""
        import psutil

        out = set()
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.add(pid)
        return out

    def stop(self) -> set[int]:
        """Workers, then the scheduler, SIGKILL after a grace period; safe to call twice.
        Returns the processes that outlived their group's shutdown (killed here: a leak)."""
        self._remember_children()
        stop_groups(
            list(self.workers.values()), timeout=15
        )  # a group outlives its leader: signal them all
        if self.scheduler is not None:
            stop_group(self.scheduler, timeout=15)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:  # orphans reparented away from us
            time.sleep(0.2)
        leaked = self.alive()
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return leaked

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}"
            for log in sorted(self.folder.glob("*.log"))
        )
