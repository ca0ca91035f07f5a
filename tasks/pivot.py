"""Build the pivotal cube block by block: every modality on one daily axis, gap-filled, with age.

A block is one shard-sized window of a tile: it reads its obs (all dates, so interpolation has
its anchors), fills days [first_day, n_days) with the configured method and writes int16 codes
straight into the cube. Blocks never share a shard, so they run in parallel: on the Dask cluster
of `dask.address` (each block a self-contained job of URLs and settings), else on local threads.

The cube is built once, then kept current (`build_pivot`): when ingest brings new acquisitions
or the period grows, only the days the new observations can change are recomputed and the new
days appear in one metadata switch. Re-running with nothing new writes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pivotmap import __version__
from pivotmap.results import IngestResult, PivotResult
from pivotmap.runtime import keep_freed_memory, kv, run_logger
from pivotmap.tasks import cube
from pivotmap.tasks.cluster import map_tiles
from pivotmap.tasks.gapfill import INT16_FILL, get_method
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

if TYPE_CHECKING:
    from pivotmap.config import RunConfig
    from pivotmap.tasks.grid import Tile
    from pivotmap.tasks.workspace import Workspace

MODALITY_VARIABLES = {"s2": list(S2_VARIABLES), "s1": list(S1_VARIABLES)}
AGE_ATTRS = (
    "age_<modality> = days from this day to the nearest valid observation of that modality, "
    "before or after it (0 = observed that day; never negative: the direction is not encoded; "
    "capped at age_cap_days; _FillValue where no value was filled)"
)


@dataclass(frozen=True)
class FillSettings:
    """What decides the filled values: method, hold limit, age cap and the first day."""

    method: str
    max_hold_days: int
    age_cap_days: int
    start: dt.date


@dataclass(frozen=True)
class Tail:
    """An in-place update: the days the cube had, and per modality the first new obs day."""

    old_days: int
    changed_from: dict[str, int | None]  # None: that modality has no new observations


@dataclass(frozen=True)
class Block:
    """One shard-sized window of the cube (rows, cols in cube pixels)."""

    rows: slice
    cols: slice


def daily_times(start: dt.date, end: dt.date) -> np.ndarray:
    """The pivot's time axis: every day from start to end inclusive."""
    return np.arange(np.datetime64(start, "D"), np.datetime64(end, "D") + 1).astype(
        "datetime64[ns]"
    )


def blocks_of(rows: slice, cols: slice, shard_xy: int) -> list[Block]:
    """Split a tile's window into shard-aligned blocks."""
    spans = (rows.start, rows.stop), (cols.start, cols.stop)
    return [Block(r, c) for r, c in cube.iter_windows(*spans, shard_xy)]


def obs_days(group, start: dt.date) -> np.ndarray:
    """Day index (0 = `start`) of every date of an obs cube."""
    days = np.asarray(group["time"][:], dtype=np.int64)
    return days - (np.datetime64(start, "D") - np.datetime64("1970-01-01", "D")).astype(np.int64)


def build_block(
    obs: dict[str, object],
    pivot,
    block: Block,
    settings: FillSettings,
    n_days: int,
    tail: Tail | None = None,
) -> dict:
    """Fill one block and write it; returns the first day written and valid fractions.

    With `tail` this is an update: only the days the new observations can change and the days
    past the old end are recomputed. Without it the block is filled from day 0.
    """
    method = get_method(settings.method)
    inputs = {}
    for m, group in obs.items():
        names = [v for v in MODALITY_VARIABLES[m] if v in pivot]
        inputs[m] = (
            obs_days(group, settings.start),
            cube.read_block(group, names, block.rows, block.cols),
        )
    first = 0 if tail is None else _first_day(method, inputs, tail, settings)
    encoded: dict[str, np.ndarray] = {}
    valid: dict[str, float] = {}
    for m, (days, values) in inputs.items():
        scales = {v: cube.VARIABLES[v].scale for v in values} | {"age": 1.0}
        res = method.fill(
            values,
            days - first,
            n_days - first,
            settings.max_hold_days,
            settings.age_cap_days,
            scales,
        )
        encoded |= res.values | {f"age_{m}": res.age}
        valid[f"valid_{m}"] = float((res.age != INT16_FILL).mean()) if res.age.size else 0.0
    if first < n_days:
        cube.write_block(pivot, encoded, first, block.rows, block.cols, n_days)
    return {"first_day": first, **valid}


def fill_region(
    obs: dict[str, object],
    pivot,
    rows: slice,
    cols: slice,
    shard_xy: int,
    settings: FillSettings,
    n_days: int,
    tail: Tail | None = None,
) -> list[dict]:
    """`build_block` over the shard-aligned blocks of a window, in parallel on Dask threads."""
    import dask

    tasks = [
        dask.delayed(build_block)(obs, pivot, b, settings, n_days, tail)
        for b in blocks_of(rows, cols, shard_xy)
    ]
    return list(dask.compute(*tasks, scheduler="threads"))


def _first_day(method, inputs, tail: Tail, settings) -> int:
    """Earliest day of this block that new observations or new days change."""
    first = tail.old_days
    for m, (days, values) in inputs.items():
        new = tail.changed_from.get(m)
        if new is None:
            continue
        valid = np.all([np.isfinite(v) for v in values.values()], axis=0)
        first = min(first, method.first_changed_day(valid, days, new, settings.max_hold_days))
    return max(0, first)


@dataclass(frozen=True)
class CubeState:
    """What a pivot cube holds: settings key, last day, and the obs dates/items per modality."""

    version: str
    base_key: str  # grid, first day, variables and fill settings: must match to update in place
    end: dt.date
    dates: dict[str, tuple[str, ...]]  # modality -> ISO obs dates used
    items: dict[str, str]  # modality -> hash of the item ids used

    def attrs(self) -> dict:
        """The state as cube attributes (JSON)."""
        out: dict[str, str | list[str]] = {"cube_version": self.version, "base_key": self.base_key}
        out["period_end"] = self.end.isoformat()
        for m in self.dates:
            out[f"obs_dates_{m}"] = list(self.dates[m])
            out[f"obs_items_{m}"] = self.items[m]
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> CubeState | None:
        """The state recorded in a cube's attributes, or None for a cube without one."""
        try:
            mods = [k.removeprefix("obs_items_") for k in attrs if k.startswith("obs_items_")]
            return cls(
                version=attrs["cube_version"],
                base_key=attrs["base_key"],
                end=dt.date.fromisoformat(attrs["period_end"]),
                dates={m: tuple(attrs[f"obs_dates_{m}"]) for m in mods},
                items={m: attrs[f"obs_items_{m}"] for m in mods},
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class UpdatePlan:
    """How to bring a cube to a target state."""

    mode: str  # "current" | "update" | "create"
    reason: str
    tail: Tail | None = None  # set for "update"


def plan_update(current: CubeState | None, target: CubeState, start: dt.date) -> UpdatePlan:
    """Nothing to do, an in-place update of the tail, or a rebuild (with the reason)."""
    if current is None:
        return UpdatePlan("create", "no cube yet")
    if current.base_key != target.base_key:
        why = "grid, first day, variables, fill settings or storage layout changed"
        return UpdatePlan("create", why)
    if target.end < current.end:
        return UpdatePlan("create", f"period now ends {target.end}, before {current.end}")
    if set(current.dates) != set(target.dates):
        return UpdatePlan("create", "the modalities changed")
    changed: dict[str, int | None] = {}
    for m, dates in target.dates.items():
        old, new = set(current.dates[m]), set(dates)
        if old == new and current.items[m] == target.items[m]:
            changed[m] = None
        elif old < new:
            first_new = dt.date.fromisoformat(min(new - old))
            changed[m] = (first_new - start).days
        else:
            why = "dates were removed" if not old <= new else "items on known dates changed"
            return UpdatePlan("create", f"{m}: {why}")
    if target.end == current.end and all(v is None for v in changed.values()):
        return UpdatePlan("current", "no new observations or days")
    tail = Tail((current.end - start).days + 1, changed)
    return UpdatePlan("update", f"new days to {target.end} / new observations", tail)


# ---------------------------------------------------------------------------- the stage


def build_pivot(ws: Workspace, force: bool = False) -> PivotResult:
    """Build, resume or update the pivot cube tile by tile, then run the cube quality suite."""
    from pivotmap.tasks.quality import validate_cube

    started = time.monotonic()
    keep_freed_memory()  # block after block re-uses the same output memory (see its docstring)
    config, tiles = ws.config, ws.tiles()
    ingest = ws.read_result(IngestResult)
    obs = {m: cube.open_group(ws.obs_url(m), mode="r") for m in ingest.modalities}
    target = target_state(config, ingest, obs)
    plan = plan_pivot(ws, tiles, target, force)
    times = daily_times(config.period.start, config.period.end)
    if plan.mode == "create" and (
        force or cube_attrs(ws.pivot_url).get("cube_version") != target.version
    ):
        create_pivot(ws, target, times, list(obs))
    done: list[dict] = []
    reused = [t.id for t in tiles]
    if plan.mode != "current":
        done, reused = fill_tiles(ws, tiles, list(obs), target.version, plan, len(times))
        cube.publish_days(cube.open_group(ws.pivot_url), times, pivot_attrs(config, target))
    quality = validate_cube(
        cube.open_cube(ws.pivot_url), min_valid_fraction=config.pivot.min_valid_fraction
    )
    run_logger("pivot").info(
        "pivot %s (%s: %s): %d tiles written, quality %s", target.version, plan.mode,
        plan.reason, len(done), "passed" if quality.success else "FAILED",
    )  # fmt: skip
    result = PivotResult(
        cube=ws.pivot_url, cube_version=target.version, mode=plan.mode, reason=plan.reason,
        tiles_written=done, tiles_already_done=reused, quality=quality.to_dict(),
        duration_s=round(time.monotonic() - started, 2),
    )  # fmt: skip
    ws.write_result(result)
    return result


def fill_tiles(
    ws: Workspace,
    tiles: list[Tile],
    modalities: list[str],
    key: str,
    plan: UpdatePlan,
    n_days: int,
) -> tuple[list[dict], list[str]]:
    """Fill every tile not yet marked done with `key`; (infos written, ids skipped).

    The blocks of all those tiles are jobs on `dask.address` (or local threads); a tile is
    marked done as soon as its last block is written, so a stopped run resumes tile by tile.
    """
    logger = run_logger("pivot")
    cfg = ws.config
    settings = FillSettings(
        cfg.pivot.method, cfg.pivot.max_hold_days, cfg.pivot.age_cap_days, cfg.period.start
    )
    extent = ws.extent(tiles)
    _, shard = cube.shard_size(cfg.grid.tile_size)
    obs_urls = tuple((m, ws.obs_url(m)) for m in modalities)
    jobs: list[BlockJob] = []
    reused: list[str] = []
    for tile in tiles:
        if ws.is_done("pivot", tile.id, key):
            reused.append(tile.id)
            logger.info(kv("pivot.tile", tile=tile.id, status="skipped", key=key))
            continue
        rows, cols = tile.slices_in(extent)
        jobs += [
            BlockJob(tile.id, b, obs_urls, ws.pivot_url, settings, n_days, plan.tail)
            for b in blocks_of(rows, cols, shard)
        ]
    left = Counter(job.tile for job in jobs)
    blocks: dict[str, list[tuple[int, int, dict]]] = defaultdict(list)
    done: list[dict] = []

    def finished(job: BlockJob, result: dict) -> None:
        blocks[job.tile].append((job.block.rows.start, job.block.cols.start, result))
        left[job.tile] -= 1
        if left[job.tile] == 0:  # its blocks in place order, whatever order they finished in
            info = tile_info(job.tile, [r for *_, r in sorted(blocks.pop(job.tile))])
            ws.mark_done("pivot", job.tile, key, info)
            done.append(info)
            logger.info(kv("pivot.tile", tile=job.tile, status="written", key=key))

    map_tiles(cfg.dask.address, pivot_block, jobs, on_done=finished, progress="pivot")
    order = {t.id: i for i, t in enumerate(tiles)}
    return sorted(done, key=lambda info: order[info["tile"]]), reused


@dataclass(frozen=True)
class BlockJob:
    """One block of one tile as a worker gets it: URLs and settings, never open handles (a
    worker on another machine opens the cubes itself, its credentials from its environment)."""

    tile: str
    block: Block
    obs_urls: tuple[tuple[str, str], ...]  # (modality, obs cube URL)
    pivot_url: str
    settings: FillSettings
    n_days: int
    tail: Tail | None = None


def pivot_block(job: BlockJob) -> dict:
    """Open the cubes by URL and fill one block. Idempotent: a block rerun after its worker was
    lost writes the same bytes to the same shard, which no other block touches."""
    keep_freed_memory()
    obs = {m: cube.open_group(url, mode="r") for m, url in job.obs_urls}
    pivot = cube.open_group(job.pivot_url)
    return build_block(obs, pivot, job.block, job.settings, job.n_days, job.tail)


def tile_info(tile_id: str, results: list[dict]) -> dict:
    """A tile's first day written and its mean valid fractions, from its blocks' results."""
    info = {"tile": tile_id, "first_day": min(r["first_day"] for r in results)}
    for key in results[0]:
        if key.startswith("valid_"):
            info[key] = round(float(np.mean([r[key] for r in results])), 4)
    return info


def pivot_variables(modalities: list[str]) -> list[str]:
    """The pivot's variables: per modality its bands and its age."""
    variables = []
    for m in ("s2", "s1"):
        if m in modalities:
            variables += [*MODALITY_VARIABLES[m], f"age_{m}"]
    return variables


def target_state(config: RunConfig, ingest: IngestResult, obs: dict) -> CubeState:
    """The state the cube should reach: settings key, last day, obs dates and items."""
    method = get_method(config.pivot.method)
    base = {
        "grid": config.grid.model_dump(mode="json"),
        "start": config.period.start.isoformat(),
        # a cube keeps the zstd level it was created with: changing it rebuilds nothing
        "pivot": config.pivot.model_dump(mode="json", exclude={"min_valid_fraction", "zstd_level"}),
        "method_version": method.version,
        "modalities": sorted(obs),
        "layout": cube.LAYOUT_VERSION,  # another codec chain: rebuild, never append to it
    }
    dates = {
        m: tuple(str(d) for d in np.asarray(g["time"][:], dtype="datetime64[D]"))
        for m, g in obs.items()
    }
    items = {m: _digest("\n".join(sorted(ingest.modalities[m].item_ids))) for m in obs}
    base_key = _digest(json.dumps(base, sort_keys=True))
    payload = {"base": base_key, "end": config.period.end.isoformat(), "items": items}
    version = _digest(json.dumps(payload, sort_keys=True))
    return CubeState(version, base_key, config.period.end, dates, items)


def plan_pivot(ws: Workspace, tiles: list[Tile], target: CubeState, force: bool) -> UpdatePlan:
    """Create (forced, or no complete cube to update), resume, update in place, or nothing."""
    if force:
        return UpdatePlan("create", "forced")
    current = CubeState.from_attrs(cube_attrs(ws.pivot_url))
    if current is not None and current.version == target.version:
        if all(ws.is_done("pivot", t.id, target.version) for t in tiles):
            return UpdatePlan("current", "cube is current")
        return UpdatePlan("create", "resuming an unfinished build")
    known = {current.version, target.version} if current else set()
    complete = all((ws.marker("pivot", t.id) or {}).get("key") in known for t in tiles)
    if current is not None and not complete:
        return UpdatePlan("create", "the existing cube is incomplete")
    return plan_update(current, target, ws.config.period.start)


def create_pivot(
    ws: Workspace, target: CubeState, times: np.ndarray, modalities: list[str]
) -> None:
    """A new, empty cube (metadata and coordinates) with the target state in its attributes."""
    cfg = ws.config
    tmpl = cube.template(
        ws.extent(ws.tiles()), times, pivot_variables(modalities), pivot_attrs(cfg, target)
    )
    layout = cube.pivot_layout(cfg.pivot.time_chunk_days, len(times), cfg.pivot.zstd_level)
    cube.create(ws.pivot_url, tmpl, cfg.grid.tile_size, layout=layout)
    ws.clear_stage("pivot")


def cube_attrs(url: str) -> dict:
    """The attributes of the cube at `url`, or {} where there is none."""
    try:
        return dict(cube.open_cube(url).attrs)
    except Exception:  # no cube yet
        return {}


def pivot_attrs(config: RunConfig, target: CubeState) -> dict:
    """The pivot cube's CF and provenance attributes, with the state it holds."""
    method = get_method(config.pivot.method)
    return {
        "title": f"pivotmap pivotal cube for {config.name}",
        "Conventions": "CF-1.8",
        "source": "Sentinel-2 L2A and Sentinel-1 via STAC, ingested by pivotmap",
        "software": f"pivotmap {__version__}",
        "gap_filling": f"{method.name} v{method.version}: "
        + getattr(method, "description", "a registered gap-filling method"),
        "gap_filling_method": method.name,
        "max_hold_days": config.pivot.max_hold_days,
        "age_cap_days": config.pivot.age_cap_days,
        "age_definition": AGE_ATTRS,
        "period_start": config.period.start.isoformat(),
        **target.attrs(),
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
