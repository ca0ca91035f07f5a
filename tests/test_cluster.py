"""A run on a real Dask cluster of processes, its run folder on S3, a worker killed mid-stage.

A `dask scheduler` and two `dask worker` processes on 127.0.0.1, started as production starts
them, share nothing with the driver but the run folder's URL (`s3://`, a moto server) and the
storage endpoint and credentials in their own environment. With `dask.address` set, ingest,
pivot, sample and predict run their reads, blocks and tiles there; train and publish run in
the driver. In each of those four stages one worker is SIGKILLed while the stage's tasks run
on it and a replacement joins; every stage still succeeds, and the cube and the published maps
equal those of the same config run into a local folder without a cluster.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pivotmap.flows.cli import STAGES
from tests.procs import ProcessCluster
from tests.small_runs import (
    TILES,
    cli,
    generate_small_region,
    write_small_config,
)


def cluster_test(fn):
    """The run on the cluster: minutes, and a fault injected (the fast tests below are not)."""
    return pytest.mark.slow(pytest.mark.faults(fn))


BUCKET = "cluster-run"
# The stages a worker is killed in, and the prefix of their tasks' keys (the job function).
KILL = {
    "ingest": "read_date",
    "pivot": "pivot_block",
    "sample": "sample_tile",
    "predict": "run_tile_job",
}


class Killer(threading.Thread):
    """SIGKILLs the first worker the scheduler has a `prefix` task processing on (the stage's
    work is in flight there), starts a replacement, and waits until the scheduler drops it."""

    def __init__(self, cluster: ProcessCluster, prefix: str) -> None:
        super().__init__(daemon=True, name=f"kill-{prefix}")
        self.cluster, self.prefix = cluster, prefix
        self.stop = threading.Event()
        self.victim: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.cluster.client() as client:
                while not self.stop.is_set():
                    for address, keys in client.processing().items():
                        mine = [str(k) for k in keys if str(k).startswith(self.prefix)]
                        if mine:
                            self._kill(client, address, mine)
                            return
                    time.sleep(0.02)
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def _kill(self, client, address: str, keys: list[str]) -> None:
        name = client.scheduler_info()["workers"][address]["name"]
        pid = client.run(os.getpid, workers=[address])[address]  # alive, running the stage
        code = self.cluster.kill(self.cluster.workers[name])
        killed_at = time.monotonic()
        self.cluster.add_worker()
        deadline = time.monotonic() + 60
        while address in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        left = address not in client.scheduler_info()["workers"]
        self.victim = {"address": address, "name": name, "pid": pid, "keys": keys,
                       "exit_code": code, "left_scheduler": left, "killed_at": killed_at}  # fmt: skip


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    """The generated demo region (FOLDER/data) that both runs read."""
    folder = tmp_path_factory.mktemp("region")
    generate_small_region(folder / "data")
    return folder


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Scheduler and two workers, their environment the driver's (moto endpoint, keys)."""
    procs = ProcessCluster(tmp_path_factory.mktemp("cluster"), dict(os.environ))
    try:
        yield procs.start(workers=2)
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def cluster_run(region, cluster, prefect_server, tmp_path_factory):
    """Every stage into `s3://BUCKET/run` with `dask.address`; a worker killed in each stage of
    KILL. (stage -> (code, summary, stdout), stage -> victim, cwd, stage -> seconds)"""
    from pivotmap.tasks.storage import s3_client

    s3_client().create_bucket(Bucket=BUCKET)
    mlflow = tmp_path_factory.mktemp("mlflow-cluster")
    config = write_small_config(
        region, "cluster.yaml", mlflow / "mlflow.db", {"dask": {"address": cluster.address}}
    )
    cwd = tmp_path_factory.mktemp("cwd")
    stages: dict[str, tuple[int, dict, str]] = {}
    victims: dict[str, dict | None] = {}
    seconds: dict[str, float] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for stage in STAGES:
            killer = Killer(cluster, KILL[stage]) if stage in KILL else None
            if killer:
                killer.start()
            started, ended = time.monotonic(), float("inf")
            try:
                stages[stage] = cli([stage, "--config", str(config), "--out", f"s3://{BUCKET}/run"])
                ended = time.monotonic()
            finally:
                if killer:
                    killer.stop.set()
                    killer.join(timeout=90)
                    assert killer.error is None, repr(killer.error)
                    victims[stage] = killer.victim and {**killer.victim, "stage_ended": ended}
            seconds[stage] = round(time.monotonic() - started, 1)
            if stages[stage][0] != 0:
                break
    return stages, victims, cwd, seconds


@pytest.fixture(scope="module")
def local_run(region, tmp_path_factory) -> Path:
    """The same config, MLflow store apart, into a local folder without a cluster."""
    mlflow = tmp_path_factory.mktemp("mlflow-local")
    config = write_small_config(region, "local.yaml", mlflow / "mlflow.db")
    out = tmp_path_factory.mktemp("local-run")
    for stage in STAGES:
        code, _, stdout = cli([stage, "--config", str(config), "--out", str(out)])
        assert code == 0, f"the local reference run failed in {stage}: {stdout[-3000:]}"
    return out


def _s3_bytes(key: str) -> bytes:
    from pivotmap.tasks.storage import s3_client

    return s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


@cluster_test
def test_every_stage_succeeds_on_the_cluster(cluster_run, cluster):
    stages, _, cwd, seconds = cluster_run
    failed = {s: out[-3000:] for s, (code, _, out) in stages.items() if code != 0}
    assert not failed, f"{failed}\n{cluster.logs()}"
    assert list(stages) == list(STAGES)
    assert all(summary.get("ok", True) for _, summary, _ in stages.values())
    tiles = TILES * TILES
    assert len(stages["pivot"][1]["tiles_written"]) == tiles
    assert len(stages["predict"][1]["tiles"]) == tiles
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing written where it ran from
    print(f"cluster run, seconds per stage: {seconds}")


@cluster_test
def test_a_worker_was_killed_in_the_middle_of_every_cluster_stage(cluster_run, cluster):
    import signal

    _, victims, _, _ = cluster_run
    for stage, prefix in KILL.items():
        if stage not in STAGES:
            continue
        victim = victims.get(stage)
        assert victim, f"no worker was running a {prefix} task during {stage}"
        assert all(k.startswith(prefix) for k in victim["keys"]), victim
        assert victim["exit_code"] == -signal.SIGKILL, victim
        assert victim["pid"] not in cluster.alive(), victim  # the worker process went too
        assert victim["left_scheduler"], f"the scheduler still lists {victim['address']}"
        assert victim["killed_at"] < victim["stage_ended"], f"{stage} ended before the kill"
    print(f"killed: {victims}")
    with cluster.client() as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2, workers  # each one killed was replaced
        assert not {v["address"] for v in victims.values() if v} & set(workers)
        prefixes = set(
            client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
        )
    assert {prefix for stage, prefix in KILL.items() if stage in STAGES} <= prefixes, prefixes


@cluster_test
def test_the_cube_equals_a_local_build(cluster_run, local_run):
    import xarray as xr

    from pivotmap.tasks.cube import open_cube

    remote = open_cube(f"s3://{BUCKET}/run/cube/pivot.zarr")
    local = open_cube(str(local_run / "cube" / "pivot.zarr"))
    assert set(remote.data_vars) == set(local.data_vars)
    assert remote.attrs["cube_version"] == local.attrs["cube_version"]
    xr.testing.assert_equal(remote.load(), local.load())


@cluster_test
def test_published_maps_equal_those_of_a_local_run(cluster_run, local_run):
    stages, _, _, _ = cluster_run
    local_cogs = sorted(local_run.glob("products/*/E*/*.tif"))
    assert len(local_cogs) == 2 * TILES * TILES  # class and confidence per tile
    version = local_cogs[0].parent.parent.name
    for cog in local_cogs:
        remote = _s3_bytes(f"run/products/{version}/{cog.parent.name}/{cog.name}")
        assert remote == cog.read_bytes(), cog.name


@cluster_test
def test_no_secret_in_logs_and_no_process_left(cluster_run, cluster):
    stages, _, _, _ = cluster_run
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in cluster.logs(tail=10**9)
    assert all(secret not in out for _, _, out in stages.values())
    started = set(cluster.pids)
    leaked = cluster.stop()
    assert not leaked, f"processes outlived their group's shutdown: {leaked}"
    assert not cluster.alive()
    kills = sum(1 for stage in KILL if stage in STAGES)
    assert len(started) >= 1 + 2 * (2 + kills)  # scheduler; nanny and worker process each


# ---------------------------------------------------------------------------- map_tiles, fast


def _square(job: int) -> int:
    if job == 7:
        raise ValueError("job 7 is bad")
    time.sleep(0.01 * (job % 3))  # finish out of order
    return job * job


def test_map_tiles_on_threads_keeps_job_order_and_reports_each_job_once():
    from pivotmap.tasks.cluster import map_tiles

    seen: list[tuple[int, int]] = []
    caller = threading.get_ident()

    def on_done(job: int, result: int) -> None:
        assert threading.get_ident() == caller  # markers are written by the driver's thread
        seen.append((job, result))

    jobs = [0, 1, 2, 3, 4, 5]
    assert map_tiles(None, _square, jobs, workers=3, on_done=on_done) == [j * j for j in jobs]
    assert sorted(seen) == [(j, j * j) for j in jobs]
    assert map_tiles(None, _square, []) == []


def test_map_tiles_raises_the_first_error_of_a_job():
    from pivotmap.tasks.cluster import map_tiles

    done: list[int] = []
    with pytest.raises(ValueError, match="job 7 is bad"):
        map_tiles(None, _square, [1, 7, 2], workers=1, on_done=lambda job, _: done.append(job))
    assert 7 not in done


def test_an_unreachable_scheduler_names_the_setting_to_fix():
    import socket

    from pivotmap.tasks.cluster import ClusterError, connect

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClusterError, match=r"tcp://127\.0\.0\.1:\d+.*`dask\.address`"):
        connect(f"tcp://127.0.0.1:{port}", timeout="1s")


def _mmapped_bytes_of_a_window_array(keep: bool) -> int:
    """Bytes glibc serves with mmap for one live 16 MiB array made in this process (mallinfo2's
    hblkhd before and after): the whole array when it is a fresh mmap, 0 from the heap."""
    import ctypes

    import numpy as np

    from pivotmap.runtime import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]  # fmt: skip

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    if keep:
        keep_freed_memory()
    before = mallinfo2().hblkhd
    window = np.ones(4 << 20, dtype=np.float32)
    grown = mallinfo2().hblkhd - before
    del window
    return int(grown)


def test_workers_serve_window_arrays_from_the_heap_once_a_job_keeps_freed_memory():
    """A worker of Dask's nanny (MALLOC_TRIM_THRESHOLD_=65536) gets every array over 128 KiB as
    a fresh mmap, faulted in again each time; after `keep_freed_memory`, which predict's and
    pivot's jobs call first, window-sized arrays come from the heap."""
    from pivotmap.tasks.cluster import dask_client

    with dask_client("local", workers=1) as client:
        default = client.submit(_mmapped_bytes_of_a_window_array, False, pure=False).result()
        kept = client.submit(_mmapped_bytes_of_a_window_array, True, pure=False).result()
    assert default >= 16 << 20  # the nanny's setting: the array is its own mapping
    assert kept == 0


def _environ(keys: tuple[str, ...]) -> dict:
    return {k: os.environ.get(k) for k in keys}


def test_the_nannys_worker_environment_stays_out_of_the_driver(monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ and OMP_NUM_THREADS=1 in the process that starts
    its workers; a local cluster's driver keeps its own, for the processes it starts later."""
    from pivotmap.tasks.cluster import dask_client

    keys = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    with dask_client("local", workers=1) as client:
        inside = _environ(keys)
        worker = client.submit(_environ, keys, pure=False).result()
    assert worker == {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    assert inside == _environ(keys) == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": None}
