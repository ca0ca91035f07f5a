"""The processes of the production stack on one machine (`pivotmap stack`), started and stopped.

Every service is a command started in its own process group (`start_new_session`), its output in
a log file of the stack folder, and recorded as a `ServiceRecord` (name, pid, URL, log) so that
another process (`pivotmap stack down`, `status`) finds and stops it later. PostgreSQL is
Debian's server (`/usr/lib/postgresql/NN/bin`), its cluster `initdb`'d once in the stack folder
and kept across `down`/`up`, run as the `postgres` user when pivotmap runs as root (the server
refuses root), trust authentication on 127.0.0.1 only.

Stopping sends SIGTERM to each service's process group and to the groups of every descendant
found at that moment (a Prefect worker starts each flow run in a session of its own), waits, then
SIGKILLs what is left; `leftovers` says which recorded processes still run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pivotmap.tasks.pgstac_server import Cluster, free_port, pg_bin_dir, port_in_use

__all__ = ["free_port", "port_in_use"]


class StackError(RuntimeError):
    """A stack service cannot be started (port in use, missing binary, failed start)."""


@dataclass
class ServiceRecord:
    name: str
    pid: int
    url: str = ""
    log: str = ""
    port: int = 0
    pids: list[int] = field(default_factory=list)  # descendants seen when the stack came up
    # pid -> start time: a pid that the system has since given to another process is not ours
    created: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _descendants(pid: int) -> dict[int, float]:
    """The descendants of `pid` and their start times."""
    import psutil

    out = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[child.pid] = child.create_time()
    return out


def _created(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> ServiceRecord:
    """Start `cmd` in its own process group, output appended to `log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise StackError(f"{name}: cannot run {cmd[0]}: {exc.strerror}") from exc
    started = _created(proc.pid)
    created = {str(proc.pid): started} if started is not None else {}
    return ServiceRecord(name=name, pid=proc.pid, log=str(log), created=created)


def log_tail(log: str | Path, chars: int = 1500) -> str:
    try:
        return Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def last_error(log: str | Path) -> str:
    """The last `SomethingError: …` line of a log (else its last line), for a one-line error."""
    lines = [line.strip() for line in log_tail(log, 20000).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def wait_until(
    record: ServiceRecord, ready: Callable[[], bool], timeout: float, what: str = ""
) -> None:
    """Poll `ready()` until it is true; a StackError when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if ready():
                return
        if not _alive(record.pid):
            raise StackError(
                f"{record.name} exited while starting: {last_error(record.log)} (log "
                f"{record.log})\n{log_tail(record.log)}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{record.name} {what or 'did not answer'} within {timeout:g} s "
                f"(log {record.log})\n{log_tail(record.log)}"
            )
        time.sleep(0.3)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as answer:
        return bool(answer.status == 200)


def remember_children(records: list[ServiceRecord]) -> None:
    """Add the current descendants of each running service to its record."""
    for record in records:
        if record.pid in running(record):
            children = _descendants(record.pid)
            record.pids = sorted(set(record.pids) | set(children))
            record.created |= {str(pid): t for pid, t in children.items()}


def running(record: ServiceRecord) -> list[int]:
    """The recorded processes of `record` that still run (and are still the processes that
    were recorded: same start time)."""
    out = []
    for pid in [record.pid, *record.pids]:
        if not _alive(pid):
            continue
        expected = record.created.get(str(pid))
        if expected is None or abs((_created(pid) or 0.0) - expected) < 0.5:
            out.append(pid)
    return out


def _signal_all(pids: set[int], sig: int) -> None:
    groups = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    for group in groups:
        if group > 1 and group != os.getpgid(0):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_services(
    records: list[ServiceRecord], timeout: float = 20, killed: list[str] | None = None
) -> list[int]:
    """SIGTERM every service's group and its descendants' groups, SIGKILL what still runs after
    `timeout` seconds (the names of those services are appended to `killed`); returns the pids
    that survived even that."""
    remember_children(records)
    pids = {pid for r in records for pid in running(r)}
    for record in records:
        _signal_all(set(running(record)), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = {p for p in pids if _alive(p)}
    if left:
        if killed is not None:
            killed.extend(r.name for r in records if set(running(r)) & left)
        _signal_all(left, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in left):
            time.sleep(0.1)
    return sorted(p for p in pids if _alive(p))


# ---------------------------------------------------------------------------- PostgreSQL


class StackPostgres(Cluster):
    """A PostgreSQL cluster kept in `folder/pgdata` (initdb'd on first use, data kept across
    stops), listening on 127.0.0.1:`port` with trust authentication."""

    error = StackError

    def __init__(self, folder: Path, port: int) -> None:
        bindir = pg_bin_dir(postgis=False)
        if bindir is None:
            raise StackError(
                "PostgreSQL's server is not installed: apt-get install postgresql "
                "(Debian's binaries under /usr/lib/postgresql/NN/bin)"
            )
        super().__init__(bindir, folder, port)

    def start(self, timeout: float = 60, options: str = "") -> None:
        if not self.initialised():
            self.initdb()
        super().start(timeout, options)

    def stop(self) -> None:
        if self.pid() is not None:
            super().stop()

    def restart(self, timeout: float = 60) -> None:
        """Stop (fast: open connections are cut) and start again with the same options."""
        self._run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-m", "fast",
             "-w", "-t", str(int(timeout)), "restart"]
        )  # fmt: skip

    def ensure_databases(self, names: list[str]) -> None:
        import psycopg

        with contextlib.closing(psycopg.connect(self.dsn("postgres"), autocommit=True)) as conn:
            have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in have:
                    conn.execute(f'CREATE DATABASE "{name}"')

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
