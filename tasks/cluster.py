"""The Dask cluster a stage runs on: an existing one by address, one worker per GPU, or local CPUs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def gpu_count() -> int:
    """CUDA devices visible to torch (0 on CPU-only machines or without a driver)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU run
        return 0


@contextmanager
def dask_client(address: str, workers: int | None = None) -> Iterator:
    """A distributed Client: `address` is 'local', 'none' is handled by callers, else tcp://…."""
    from distributed import Client, LocalCluster

    if address != "local":
        with Client(address) as client:
            yield client
        return
    if gpu_count():
        from dask_cuda import LocalCUDACluster  # the `gpu` extra; one worker per GPU

        cluster = LocalCUDACluster(dashboard_address=None)
    else:
        n = workers or max(1, min(4, (os.cpu_count() or 2)))
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with cluster, Client(cluster) as client:
        yield client


def worker_device() -> str:
    """What each worker computes on: its GPU under dask-cuda, else the CPU."""
    return "cuda" if gpu_count() else "cpu"
