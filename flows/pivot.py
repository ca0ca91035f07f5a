"""Pivot flow: obs cubes → the daily, gap-filled pivotal cube with information age, then its gate.

The cube is built once, then kept current: when ingest brings new acquisitions or the period
grows, only the days the new observations can change are recomputed and the new days appear
in one metadata switch. Re-running with nothing new writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from pivotmap import __version__
from pivotmap.config import RunConfig
from pivotmap.flows.report import kv, stage_artifacts
from pivotmap.flows.workspace import Workspace
from pivotmap.progress import track
from pivotmap.tasks import cube
from pivotmap.tasks.gapfill import get_method
from pivotmap.tasks.grid import Tile
from pivotmap.tasks.pivot import (
    AGE_ATTRS,
    MODALITY_VARIABLES,
    CubeState,
    FillSettings,
    UpdatePlan,
    daily_times,
    fill_region,
    plan_update,
)


def pivot_variables(modalities: list[str]) -> list[str]:
    """The pivot's variables: per modality its bands and its age."""
    variables = []
    for m in ("s2", "s1"):
        if m in modalities:
            variables += [*MODALITY_VARIABLES[m], f"age_{m}"]
    return variables


def target_state(config: RunConfig, ingest: dict, obs: dict) -> CubeState:
    """The state the cube should reach: settings key, last day, obs dates and items."""
    method = get_method(config.pivot.method)
    base = {
        "grid": config.grid.model_dump(mode="json"),
        "start": config.period.start.isoformat(),
        "pivot": config.pivot.model_dump(mode="json", exclude={"min_valid_fraction"}),
        "method_version": method.version,
        "modalities": sorted(obs),
    }
    dates = {
        m: tuple(str(d) for d in np.asarray(g["time"][:], dtype="datetime64[D]"))
        for m, g in obs.items()
    }
    items = {m: _digest("\n".join(sorted(ingest["modalities"][m]["item_ids"]))) for m in obs}
    base_key = _digest(json.dumps(base, sort_keys=True))
    payload = {"base": base_key, "end": config.period.end.isoformat(), "items": items}
    version = _digest(json.dumps(payload, sort_keys=True))
    return CubeState(version, base_key, config.period.end, dates, items)


@task(cache_policy=NONE)
def pivot_tile_task(
    ws: Workspace,
    tile: Tile,
    obs: dict,
    pivot,
    settings: FillSettings,
    n_days: int,
    plan: UpdatePlan,
) -> dict:
    """Fill one tile, block by block on Dask threads, and write it into the pivot cube."""
    rows, cols = tile.slices_in(ws.extent(ws.tiles()))
    _, shard = cube.shard_size(ws.config.grid.tile_size)
    results = fill_region(obs, pivot, rows, cols, shard, settings, n_days, plan.tail)
    info = {"tile": tile.id, "first_day": min(r["first_day"] for r in results)}
    for key in results[0]:
        if key.startswith("valid_"):
            info[key] = round(float(np.mean([r[key] for r in results])), 4)
    return info


@flow(name="pivot")
def pivot_flow(config: RunConfig, out_dir: str, force: bool = False) -> dict:
    """Build, resume or update the pivot cube tile by tile, then run the cube quality suite."""
    from pivotmap.runtime import keep_freed_memory
    from pivotmap.tasks.quality import validate_cube

    started = time.monotonic()
    logger = get_run_logger()
    keep_freed_memory()  # block after block re-uses the same output memory (see its docstring)
    ws = Workspace.open(config, out_dir)
    ingest = ws.read_report("ingest")
    tiles = ws.tiles()
    obs = {m: cube.open_group(ws.obs_url(m), mode="r") for m in ingest["modalities"]}
    target = target_state(config, ingest, obs)
    plan = _plan(ws, tiles, target, force)
    times = daily_times(config.period.start, config.period.end)
    if plan.mode == "create" and (
        force or cube_attrs(ws.pivot_url).get("cube_version") != target.version
    ):
        _create(ws, target, times, list(obs))
    done, reused = [], []
    if plan.mode != "current":
        pivot = cube.open_group(ws.pivot_url)
        settings = FillSettings(
            config.pivot.method,
            config.pivot.max_hold_days,
            config.pivot.age_cap_days,
            config.period.start,
        )
        for tile in track(tiles, "pivot", total=len(tiles)):
            if ws.is_done("pivot", tile.id, target.version):
                reused.append(tile.id)
                logger.info(kv("pivot.tile", tile=tile.id, status="skipped", key=target.version))
                continue
            info = pivot_tile_task(ws, tile, obs, pivot, settings, len(times), plan)
            ws.mark_done("pivot", tile.id, target.version, info)
            done.append(info)
            logger.info(kv("pivot.tile", tile=tile.id, status="written", key=target.version))
        cube.publish_days(pivot, times, _attrs(config, target))
    else:
        reused = [t.id for t in tiles]
    quality = validate_cube(
        cube.open_cube(ws.pivot_url), min_valid_fraction=config.pivot.min_valid_fraction
    )
    logger.info(
        "pivot %s (%s: %s): %d tiles written, quality %s",
        target.version,
        plan.mode,
        plan.reason,
        len(done),
        "passed" if quality.success else "FAILED",
    )
    summary = {
        "stage": "pivot",
        "cube": ws.pivot_url,
        "cube_version": target.version,
        "mode": plan.mode,
        "reason": plan.reason,
        "tiles_written": done,
        "tiles_already_done": reused,
        "quality": quality.to_dict(),
        "duration_s": round(time.monotonic() - started, 2),
    }
    ws.write_report("pivot", summary)
    stage_artifacts("pivot", summary, config.name, ws.reports_dir)
    quality.raise_for_failure()
    return summary


def _plan(ws: Workspace, tiles: list[Tile], target: CubeState, force: bool) -> UpdatePlan:
    """Create (forced, or no complete cube to update), resume, update in place, or nothing."""
    if force:
        return UpdatePlan("create", "forced")
    current = CubeState.from_attrs(cube_attrs(ws.pivot_url))
    if current is not None and current.version == target.version:
        if all(ws.is_done("pivot", t.id, target.version) for t in tiles):
            return UpdatePlan("current", "cube is current")
        return UpdatePlan("create", "resuming an unfinished build")
    known = {current.version, target.version} if current else set()
    complete = all(_marker_key(ws, t) in known for t in tiles)
    if current is not None and not complete:
        return UpdatePlan("create", "the existing cube is incomplete")
    return plan_update(current, target, ws.config.period.start)


def _marker_key(ws: Workspace, tile: Tile) -> str | None:
    path = ws.marker("pivot", tile.id)
    return json.loads(path.read_text()).get("key") if path.is_file() else None


def _create(ws: Workspace, target: CubeState, times: np.ndarray, modalities: list[str]) -> None:
    """A new, empty cube (metadata and coordinates) with the target state in its attributes."""
    cfg = ws.config
    tmpl = cube.template(
        ws.extent(ws.tiles()), times, pivot_variables(modalities), _attrs(cfg, target)
    )
    layout = cube.pivot_layout(cfg.pivot.time_chunk_days, len(times))
    cube.create(ws.pivot_url, tmpl, cfg.grid.tile_size, layout=layout)
    ws.clear_stage("pivot")


def cube_attrs(url: str) -> dict:
    """The attributes of the cube at `url`, or {} where there is none."""
    try:
        return dict(cube.open_cube(url).attrs)
    except Exception:  # no cube yet
        return {}


def _attrs(config: RunConfig, target: CubeState) -> dict:
    method = get_method(config.pivot.method)
    return {
        "title": f"pivotmap pivotal cube for {config.name}",
        "Conventions": "CF-1.8",
        "source": "Sentinel-2 L2A and Sentinel-1 via STAC, ingested by pivotmap",
        "software": f"pivotmap {__version__}",
        "gap_filling": f"{method.name} v{method.version}: "
        "linear in time between valid observations; ends held for max_hold_days",
        "gap_filling_method": method.name,
        "max_hold_days": config.pivot.max_hold_days,
        "age_cap_days": config.pivot.age_cap_days,
        "age_definition": AGE_ATTRS,
        "period_start": config.period.start.isoformat(),
        **target.attrs(),
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
