"""The Dask cluster a stage runs on: an existing one by address, one worker per GPU, or local CPUs.

Workers of a running cluster share nothing with the driver but URLs: every job carries the run
folder's URLs and its settings, and the workers find the storage endpoint and credentials
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …) in their own environment, never in a task's arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from pivotmap.progress import track

J = TypeVar("J")
R = TypeVar("R")
RETRIES = 2  # reruns of a job that raised; a job lost with a killed worker is rerun anyway


class ClusterError(RuntimeError):
    """The Dask scheduler of a stage cannot be reached."""


def gpu_count() -> int:
    """CUDA devices visible to torch (0 on CPU-only machines or without a driver)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU run
        return 0


def connect(
    address: str, setting: str = "dask.address", set_as_default: bool = False, timeout: str = "30s"
):
    """A Client of the running scheduler at `address`, or a ClusterError naming `setting`."""
    from distributed import Client

    try:
        return Client(address, set_as_default=set_as_default, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot connect to the Dask scheduler {address}: {exc} — start it "
            f"(`dask scheduler`) or fix `{setting}`; null runs the stage on this machine"
        ) from exc


@contextmanager
def dask_client(address: str, workers: int | None = None) -> Iterator:
    """A distributed Client: `address` is 'local', 'none' is handled by callers, else tcp://…."""
    from distributed import Client, LocalCluster

    if address != "local":  # the default client, as callers' `as_completed` expects
        with connect(address, set_as_default=True) as client:
            yield client
        return
    # The scheduler serves its HTTP routes (health, metrics) even without a dashboard, on 8787
    # unless told otherwise: a free port, so a second cluster on the machine neither collides
    # nor warns.
    with _driver_environ() as saved:
        if gpu_count():
            from dask_cuda import LocalCUDACluster  # the `gpu` extra; one worker per GPU

            cluster = LocalCUDACluster(dashboard_address=":0")
        else:
            n = workers or max(1, min(4, (os.cpu_count() or 2)))
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        with cluster, Client(cluster) as client:
            _restore_environ(saved)  # the workers have theirs; the driver keeps its own
            yield client


@contextmanager
def _driver_environ() -> Iterator[dict[str, str | None]]:
    """Keep this process's environment as it was: Dask's nanny sets its
    `distributed.nanny.pre-spawn-environ` (MALLOC_TRIM_THRESHOLD_=65536, OMP_NUM_THREADS=1, …)
    in the process that starts the workers, where every process started later (training's
    child, a server) would inherit them too. Yields the saved values (None: unset)."""
    import dask

    keys = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield saved
    finally:
        _restore_environ(saved)  # a worker restarted by its nanny set them again


def _restore_environ(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def worker_device() -> str:
    """What each worker computes on: its GPU under dask-cuda, else the CPU."""
    return "cuda" if gpu_count() else "cpu"


def map_tiles(
    address: str | None,
    fn: Callable[[J], R],
    jobs: Sequence[J],
    workers: int | None = None,
    on_done: Callable[[J, R], Any] | None = None,
    progress: str | None = None,
) -> list[R]:
    """`fn(job)` for every job, results in job order: on the Dask scheduler at `address`
    (tcp://…), or in this process on `workers` threads when `address` is None.

    On a cluster a job lost with a killed worker is rerun elsewhere, and one that raised is
    retried RETRIES times, so `fn` must be idempotent and take everything it needs in `job`
    (URLs and settings; no open handles, no credentials). `on_done(job, result)` runs here, in
    the calling thread, as each job finishes (markers: a crash loses no finished job);
    `progress` names a progress bar/artifact counting finished jobs.
    """
    if not jobs:
        return []
    finished = _on_cluster(address, fn, jobs) if address else _on_threads(fn, jobs, workers)
    stream = track(finished, progress, total=len(jobs)) if progress else finished
    results: dict[int, R] = {}
    try:
        for i, result in stream:
            results[i] = result
            if on_done is not None:
                on_done(jobs[i], result)
    finally:
        finished.close()  # after an error (here or in a job) nothing new starts
    return [results[i] for i in range(len(jobs))]


def _on_threads(
    fn: Callable[[J], R], jobs: Sequence[J], workers: int | None
) -> Generator[tuple[int, R], None, None]:
    """(index, result) as jobs finish on a local thread pool; the first error stops the rest."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    n = workers or max(1, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(n, thread_name_prefix="pivotmap-tile") as pool:
        index = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        try:
            for future in as_completed(index):
                yield index[future], future.result()
        finally:
            for future in index:
                future.cancel()  # after an error (or an early stop) nothing new starts


def _on_cluster(
    address: str, fn: Callable[[J], R], jobs: Sequence[J]
) -> Generator[tuple[int, R], None, None]:
    """(index, result) as jobs finish on the scheduler at `address`; closing releases the rest."""
    from distributed import as_completed

    with connect(address) as client:
        futures = client.map(fn, list(jobs), pure=False, retries=RETRIES)
        index = {future.key: i for i, future in enumerate(futures)}
        try:
            for future in as_completed(futures, loop=client.loop):
                yield index[future.key], future.result()
        finally:
            client.cancel(futures)
