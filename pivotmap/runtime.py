"""Process-wide defaults that keep pivotmap offline and quiet unless the user says otherwise."""

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

OFFLINE_DEFAULTS = {
    # Prefect: the temporary local server needs more than the 20 s default on a cold database.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # MLflow and friends: no telemetry ("true", the word, is what DO_NOT_TRACK expects).
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # GDAL: no directory listings on remote opens.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Dask: its scheduler and nannies log every worker start and stop at INFO (30 lines a
    # predict): warnings and errors only (workers inherit it).
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


def apply_offline_defaults() -> None:
    """Set every default the user has not set; called once at each entry point."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # MLflow's S3 artifact store does not read AWS_ENDPOINT_URL: a run folder on an S3-compatible
    # store (MinIO, moto) keeps its MLflow artifacts on the same endpoint.
    if os.environ.get("AWS_ENDPOINT_URL"):
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"])


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let this process re-use the memory of big arrays it frees instead of returning it.

    By default glibc serves every array over 32 MiB with a fresh mmap and unmaps it on free,
    so a worker that fills block after block faults in (and zeroes) all of its output again
    for every block; on VMs with free-page reporting (Firecracker, cloud hosts) each of those
    pages is then a host fault too. Dask's nanny makes it worse in every worker it starts:
    its MALLOC_TRIM_THRESHOLD_=65536 pins that threshold at 128 KiB, so each window-sized array
    is a fresh mmap (a predict tile took twice as long, with ten times the system time). Arrays
    up to `limit_bytes` are served from the heap and the heap is never trimmed: the resident
    size stays at the peak the work needs anyway. Job functions call it first, so it holds
    however their worker was started.
    Linux/glibc only; returns False (and changes nothing) elsewhere.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, int(limit_bytes))
            and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB.

    VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a spawned worker
    would report the peak of the process that started it.
    """
    from pathlib import Path

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- logging
def kv(event: str, **fields) -> str:
    """A structured log line: `event key=value …` (values without spaces stay greppable)."""
    parts = [event] + [f"{k}={_kv_value(v)}" for k, v in fields.items()]
    return " ".join(parts)


def _kv_value(value) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def run_logger(name: str):
    """The Prefect run logger inside a flow or task run, else the `pivotmap.<name>` logger."""
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow run (tests, scripts, plain function calls)
        return logging.getLogger(f"pivotmap.{name}")


# ---------------------------------------------------------------------------- concurrency
# Global concurrency limits (`prefect gcl create NAME --limit N`): every run of every deployment
# shares them, so a country-scale backfill cannot flood the STAC API or the object store.
CONCURRENCY_LIMITS = {"stac-requests": 4, "s3-requests": 8}


@contextmanager
def request_slot(limit: str) -> Iterator[None]:
    """Hold one slot of a global concurrency limit while a STAC or S3 request stream runs.

    Only inside a flow run (so plain function calls and unit tests never contact an API), and
    only where the limit exists (created by `flows/deploy.py`): a run on a temporary server has
    none, and Prefect would warn at every request that it lets the request through.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or not _limit_exists(limit, str(context.client.api_url)):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, strict=False):
        yield


_LIMITS: dict[tuple[str, str], bool] = {}


def _limit_exists(limit: str, api: str) -> bool:
    """Whether the Prefect API at `api` has the global concurrency limit: asked once per API
    and limit (a client is opened only then), remembered for every later request."""
    if (api, limit) not in _LIMITS:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(limit)
                _LIMITS[api, limit] = True
            except ObjectNotFound:
                _LIMITS[api, limit] = False
    return _LIMITS[api, limit]


def console_output(show: bool) -> None:
    """The console of a CLI run: whether it shows the tracebacks that logged errors carry
    (Prefect logs every flow and task failure with one; without, an error ends in its one-line
    log record and the CLI's `pivotmap: error:` line, and the Prefect API still receives the
    whole trace), and without libraries' chatter that says nothing to an operator."""
    import logging

    import prefect  # noqa: F401  (configures logging: the console handler exists after this)

    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if show and isinstance(formatter, _WithoutTraceback):
            handler.setFormatter(formatter.inner)
        elif not show and formatter is not None and not isinstance(formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(formatter))
    for name in _KnownNoise.LOGGERS:  # a logger's filters see the records made on it
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise())


class _KnownNoise(logging.Filter):
    """Library lines that say nothing to an operator, kept off the console (a warnings filter
    cannot drop MLflow's: it re-enables its own while it defines the logged model's class)."""

    LOGGERS = ("py.warnings", "great_expectations.data_context.types.base")
    NOISE = (
        # the logged pyfunc has an explicit signature, which is what MLflow checks inputs against
        "Add type hints to the `predict` method",
        # Great Expectations, at every quality gate
        "for ephemeral docs site",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(n in text for n in self.NOISE)


class _WithoutTraceback(logging.Formatter):
    """A formatter that formats a copy of each record without its exception and stack."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        bare = logging.makeLogRecord(record.__dict__)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def exit_now(code: int) -> NoReturn:
    """Exit at once after an interrupt: Prefect's queued logs and events are sent to its API and
    the exit handlers run (the temporary API server stops last), but the interpreter's own
    finalisation is skipped: seconds of library teardown (torch, GDAL, Dask) that a user who
    pressed Ctrl-C should not wait for. Everything a re-run reuses is already on disk."""
    import atexit
    import sys

    with contextlib.suppress(Exception):  # Prefect not imported or not started: nothing queued
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
