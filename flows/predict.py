"""Predict flow: the champion model over every tile of the pivot cube → class and confidence.

Tiles run in parallel on Dask (local CPUs, one worker per GPU with dask-cuda, or an existing
cluster); each tile is streamed in windows so a worker's memory does not grow with tile size.
Finished tiles (same model version, same cube) are skipped on a re-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from pivotmap.config import RunConfig
from pivotmap.flows.report import kv, stage_artifacts
from pivotmap.flows.workspace import Workspace
from pivotmap.models.inference import TileJob, run_tile_job, save_for_workers
from pivotmap.progress import track


def tile_jobs(ws: Workspace, model_dir: str, device: str, tiles) -> list[TileJob]:
    extent = ws.extent(ws.tiles())
    cfg = ws.config.predict
    jobs = []
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        jobs.append(
            TileJob(
                tile_id=tile.id, rows=(rows.start, rows.stop), cols=(cols.start, cols.stop),
                pivot_url=ws.pivot_url, model_dir=model_dir, out_path=str(ws.maps_dir / f"{tile.id}.npz"),
                batch_size=cfg.batch_size, window=cfg.window, device=device,
            )
        )  # fmt: skip
    return jobs


@task(cache_policy=NONE)
def run_jobs(
    jobs: list[TileJob], address: str, workers: int | None, on_done: Callable[[dict], None]
) -> list[dict]:
    """Run tile jobs in this process ('none') or on a Dask cluster; results in job order.

    `on_done` gets each result as soon as its tile is written, so a crash loses no finished tile.
    """
    if address == "none" or len(jobs) <= 1:
        results = []
        for job in track(jobs, "predict", total=len(jobs)):
            results.append(run_tile_job(job))
            on_done(results[-1])
        return results
    from distributed import as_completed

    from pivotmap.flows.cluster import dask_client

    with dask_client(address, workers) as client:
        futures = client.map(run_tile_job, jobs, pure=False)
        done = {}
        for future in track(as_completed(futures), "predict", total=len(futures)):
            result = future.result()
            on_done(result)
            done[result["tile"]] = result
    return [done[job.tile_id] for job in jobs]


@flow(name="predict")
def predict_flow(
    config: RunConfig, out_dir: str, device: str | None = None, force: bool = False
) -> dict:
    """Resolve `models:/<name>@<alias>` and classify every tile not already done."""
    from pivotmap.flows.cluster import worker_device
    from pivotmap.models.registry import load_champion, tracking_uri_for

    started = time.monotonic()
    logger = get_run_logger()
    ws = Workspace.open(config, out_dir)
    dev = device or worker_device()
    model, spec, info = load_champion(
        tracking_uri=tracking_uri_for(ws.root, config.mlflow.tracking_uri),
        model_name=config.model_name, alias=config.predict.model_alias, device="cpu",
    )  # fmt: skip
    model_dir = save_for_workers(
        model, spec, ws.root / "models" / f"{info['name']}-v{info['version']}"
    )
    key = f"{info['name']}/{info['version']}@{ws.read_report('pivot')['cube_version']}"
    tiles = ws.tiles()
    todo = [t for t in tiles if force or not ws.is_done("predict", t.id, key)]
    results = run_jobs(
        tile_jobs(ws, str(model_dir), dev, todo), config.predict.dask, config.predict.workers,
        on_done=lambda result: ws.mark_done("predict", result["tile"], key, result),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    pixels = sum(r["pixels"] for r in results)
    logger.info(
        kv("predict", tiles_written=len(todo), tiles_skipped=len(tiles) - len(todo),
           model=info["name"], model_version=info["version"], cache_key=key)
    )  # fmt: skip
    summary = {
        "stage": "predict", "model": info, "device": dev, "tiles": results,
        "tiles_already_done": [t.id for t in tiles if t not in todo], "cache_key": key,
        "pixels": pixels,
        "px_per_s": round(pixels / elapsed, 1) if pixels else 0.0, "duration_s": round(elapsed, 2),
        "peak_rss_mb_per_worker": max((r["peak_rss_mb"] for r in results), default=0.0),
    }  # fmt: skip
    ws.write_report("predict", summary)
    stage_artifacts("predict", summary, config.name, ws.reports_dir)
    return summary
