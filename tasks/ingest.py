"""The ingest stage: STAC items → masked, regridded observations on their own dates (`obs` cubes).

Per modality: search the source, check the items (Great Expectations suite; failures are skipped
and reported), group them by solar day, then read tile blocks × dates on Dask and write each block
into the obs Zarr cube (a local folder or `s3://`). A finished tile is marked with a key of its
inputs (item ids, grid, period, masking settings), so a re-run reads nothing again unless `force`
is set or the inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pystac

from pivotmap.progress import track
from pivotmap.results import IngestResult, ModalityIngest
from pivotmap.runtime import kv, request_slot, run_logger
from pivotmap.tasks import cube
from pivotmap.tasks.grid import GridSpec, Tile
from pivotmap.tasks.item_checks import NO_SCL, ItemRules, check_items
from pivotmap.tasks.load import (
    DateRead,
    DateResult,
    by_day,
    close_cogs,
    item_reads,
    read_date,
    to_dataset,
)
from pivotmap.tasks.region import tiles_lonlat
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES, orbit_state
from pivotmap.tasks.stac_source import SourceError, asset_headers, item_source, require_items
from pivotmap.tasks.storage import gdal_env

if TYPE_CHECKING:
    import xarray as xr

    from pivotmap.config import RunConfig
    from pivotmap.tasks.workspace import Workspace

BATCH_BYTES = 1 << 30  # default of `ingest.batch_mb`: values held per read batch (float32)
MODALITY_VARIABLES = {"s2": list(S2_VARIABLES), "s1": list(S1_VARIABLES)}
Compute = Callable[[list], list]
Days = dict[np.datetime64, list[pystac.Item]]
Batch = list[tuple[Tile, Tile]]  # (tile, block) pairs


@dataclass(frozen=True)
class IngestIO:
    """Where reads run (`compute`), the GDAL settings they get, and the obs writer."""

    compute: Compute
    env: dict[str, str]
    writer: ObsWriter


# ---------------------------------------------------------------------------- the stage


def ingest(ws: Workspace, force: bool = False) -> IngestResult:
    """Search each configured modality, check its items and write each tile's observations."""
    started = time.monotonic()
    config, tiles = ws.config, ws.tiles()
    collections = {"s2": config.source.s2_collection, "s1": config.source.s1_collection}
    drafts: dict[str, dict] = {}
    writer = ObsWriter(ws)
    try:
        with reader(config) as compute:
            io = IngestIO(compute, gdal_env(headers=asset_headers(config.source)), writer)
            for modality, collection in collections.items():
                if collection:
                    drafts[modality] = ingest_modality(ws, modality, collection, tiles, force, io)
    finally:
        writer.close()
    modalities = {  # tile infos are complete once their writes are done
        m: ModalityIngest(**d, tiles_without_data=tiles_without_data(ws, m, d))
        for m, d in drafts.items()
    }
    result = IngestResult(
        tiles=[t.id for t in tiles],
        modalities=modalities,
        duration_s=round(time.monotonic() - started, 2),
    )
    ws.write_result(result)
    return result


def ingest_modality(
    ws: Workspace, modality: str, collection: str, tiles: list[Tile], force: bool, io: IngestIO
) -> dict:
    """Search, check, group and queue the writes of one modality; its `ModalityIngest` fields
    (the tile infos are completed in place as their writes finish)."""
    found, searched = search(ws.config, collection, tiles)
    items, skipped = screen_items(modality, found, ws.config)
    days = by_day(items)
    if modality == "s1":
        days, same_day = one_orbit_per_day(days)
        skipped += same_day
        items = [it for g in days.values() for it in g]
    period = ws.config.period
    require_items(items, collection, ws.config.source.url, period.start, period.end)
    times = np.array(list(days), dtype="datetime64[ns]")
    key, stage = inputs_key(ws.config, items), f"ingest-{modality}"
    prepare_store(ws, modality, tiles, days, key, force)
    todo = [t for t in tiles if force or not ws.is_done(stage, t.id, key)]
    reused = [t.id for t in tiles if t not in todo]
    failed = [f for t in reused for f in (ws.marker(stage, t) or {}).get("read_failures", [])]
    done = write_tiles(ws, modality, todo, days, times, key, io)
    failed += [f for info in done for f in info["read_failures"]]
    run_logger("ingest").info(kv(
        "ingest", modality=modality, items_kept=len(items), items_skipped=len(skipped),
        read_failures=len(failed), tiles_written=len(done), tiles_skipped=len(reused),
        cache_key=key,
    ))  # fmt: skip
    draft = {
        "collection": collection,
        "items_found": len(found),
        "items_used": len(items),
        "item_ids": [it.id for it in items],
        "skipped_items": skipped + [{**f, "stage": "read"} for f in _unique(failed)],
        "dates": len(times),
        "tiles_written": done,
        "tiles_already_done": reused,
        "cache_key": key,
        "cube": ws.obs_url(modality),
        "search": searched,
    }
    if modality == "s1":
        draft["orbit_states"] = dict(Counter(orbit_state(it) or "unknown" for it in items))
    return draft


def tiles_without_data(ws: Workspace, modality: str, draft: dict) -> list[dict]:
    """Tiles with no valid observation of `modality` in the period (all cloudy, or no data):
    named in the result and the log, so a map made there from the other modality alone is known."""
    stage = f"ingest-{modality}"
    infos = draft["tiles_written"] + [ws.marker(stage, t) for t in draft["tiles_already_done"]]
    empty = [
        {"tile": info["tile"], "reason": f"no valid {modality.upper()} observation in the "
         "period (all masked: clouds, shadows or no data)"}
        for info in infos if not info.get("valid_fraction")
    ]  # fmt: skip
    for row in empty:
        run_logger("ingest").warning("%s: tile %s: %s", modality, row["tile"], row["reason"])
    return empty


# ---------------------------------------------------------------------------- cache keys


def items_key(items: list[pystac.Item]) -> str:
    """A short digest of the item ids (order-free)."""
    return hashlib.sha256("\n".join(sorted(i.id for i in items)).encode()).hexdigest()[:16]


def inputs_key(config: RunConfig, items: list[pystac.Item]) -> str:
    """What a finished tile depends on: the items, the grid, the period and the masking settings."""
    ing = config.ingest
    payload = {
        "items": items_key(items),
        "grid": config.grid.model_dump(mode="json"),  # a tile id does not carry the tile size
        "period": config.period.model_dump(mode="json"),
        "mask": [list(ing.scl_mask), ing.scl_dilation_px, ing.s2_harmonisation],
        "reader": "pivotmap-v2",
        "layout": cube.LAYOUT_VERSION,  # a cube with other codecs is rebuilt, not appended to
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- items


def search(config: RunConfig, collection: str, tiles: list[Tile]) -> tuple[list[pystac.Item], dict]:
    """Items of `collection` over the tiles and period, hrefs passed through the modifier, and
    how the search went (the report's `search`: where the cloud filter ran, requests, retries).
    S2's `max_cloud_cover` goes to the server where it can; the item checks apply it anyway."""
    src, period = config.source, config.period
    ceiling = config.ingest.max_cloud_cover
    cloud = ceiling if collection == src.s2_collection and ceiling < 100 else None
    with request_slot("stac-requests"):  # a slot of the global limit shared by every run
        found = item_source(src).find(
            collection, tiles_lonlat(tiles), period.start, period.end, cloud
        )
    run_logger("ingest").info(kv("search", collection=collection, **found.info))
    require_items(found.items, collection, src.url, period.start, period.end)
    return found.items, found.info


def screen_items(modality: str, items: list[pystac.Item], config: RunConfig) -> tuple[list, list]:
    """Items fit for the cube, and the others with the reason they were skipped."""
    ing, period = config.ingest, config.period
    rules = ItemRules(
        modality, period.start, period.end, ing.max_cloud_cover,
        ing.s1_orbit_state if modality == "s1" else None,
    )  # fmt: skip
    checked = check_items(items, rules)
    if modality == "s2" and ing.s2_without_scl == "error":
        no_scl = [k for k, v in checked.failures.items() if any(NO_SCL in r for r in v)]
        if no_scl:
            raise SourceError(
                f"{len(no_scl)} S2 item(s) have no SCL asset and cannot be cloud-masked, e.g. "
                f"{', '.join(no_scl[:3])} — use a collection that serves SCL or set "
                "`ingest.s2_without_scl: skip` to leave them out"
            )
    return checked.passed, checked.skipped()


def one_orbit_per_day(days: Days) -> tuple[Days, list[dict]]:
    """S1: a day keeps one orbit direction (the run's most common); other passes are reported.

    Ascending and descending backscatter differ; mosaicking them into one date would mix them.
    """
    overall = Counter(orbit_state(it) for group in days.values() for it in group)
    kept, skipped = {}, []
    for day, group in days.items():
        states = Counter(orbit_state(it) for it in group)
        best = max(states, key=lambda s: (overall[s], states[s], s or ""))
        kept[day] = [it for it in group if orbit_state(it) == best]
        skipped += [
            {
                "item": it.id,
                "reason": f"same solar day as a {best} pass (set ingest.s1_orbit_state)",
            }
            for it in group
            if orbit_state(it) != best
        ]
    return kept, skipped


def _unique(rows: list[dict]) -> list[dict]:
    """The first row of each item (an item that failed for several tiles is reported once)."""
    seen, out = set(), []
    for row in rows:
        if row["item"] not in seen:
            seen.add(row["item"])
            out.append(row)
    return out


def _touches(item: pystac.Item, tile: Tile) -> bool:
    """Whether the item's footprint (if it has one) meets the tile."""
    from odc.geo.geom import Geometry

    return item.geometry is None or Geometry(item.geometry, crs="EPSG:4326").intersects(
        tile.footprint.to_crs("EPSG:4326")
    )


# ---------------------------------------------------------------------------- the obs cube


def obs_template(ws: Workspace, modality: str, tiles: list[Tile], days: Days, key: str):
    """The empty obs cube of a modality over `tiles` and the days; S1 carries its orbit states."""
    times = np.array(list(days), dtype="datetime64[ns]")
    tmpl = cube.template(ws.extent(tiles), times, MODALITY_VARIABLES[modality], {"items_key": key})
    if modality != "s1":
        return tmpl
    # CF flags, not strings: Zarr v3 has no portable fixed-width string type.
    codes = {"ascending": 0, "descending": 1}
    states = [codes.get(orbit_state(g[0]) or "", -1) for g in days.values()]
    tmpl = tmpl.assign_coords(orbit_state=("time", np.array(states, dtype="int8")))
    tmpl["orbit_state"].attrs.update(
        long_name="Sentinel-1 orbit direction (sat:orbit_state)",
        flag_values=[0, 1],
        flag_meanings="ascending descending",
        missing_value=-1,
    )
    return tmpl


def prepare_store(
    ws: Workspace, modality: str, tiles: list[Tile], days: Days, key: str, force: bool
) -> None:
    """(Re)create the obs cube when forced or when its inputs changed; markers follow it."""
    url, stage = ws.obs_url(modality), f"ingest-{modality}"
    if not force and all(ws.is_done(stage, t.id, key) for t in tiles):
        return
    if not force and _store_matches(url, key):
        return
    tmpl = obs_template(ws, modality, tiles, days, key)
    # Obs cubes are written block by block and read tile by tile: one inner chunk per shard.
    cube.create(url, tmpl, ws.config.grid.tile_size, chunk_per_shard=True)
    ws.clear_stage(stage)


def _store_matches(url: str, key: str) -> bool:
    """Whether the cube at `url` was made for inputs `key`."""
    try:
        return cube.open_cube(url).attrs.get("items_key") == key
    except Exception:  # no store yet, or an unreadable one: rebuild it
        return False


# ---------------------------------------------------------------------------- reading


@contextmanager
def reader(config: RunConfig) -> Iterator[Compute]:
    """Run lists of delayed reads on the configured Dask scheduler, or on local threads."""
    import dask

    # `dask.address` (every tile stage's cluster) wins over the older `ingest.scheduler_address`.
    address = config.dask.address or config.ingest.scheduler_address
    workers = config.ingest.workers
    if address:
        from pivotmap.tasks.cluster import connect

        setting = "dask.address" if config.dask.address else "ingest.scheduler_address"
        with connect(address, setting) as client:
            try:
                yield lambda lazy: client.compute(lazy, sync=True)
            finally:
                client.run(close_cogs, on_error="ignore")  # the COGs workers kept open
        return
    try:
        yield lambda lazy: list(dask.compute(*lazy, scheduler="threads", num_workers=workers))
    finally:
        close_cogs()


def blocks(tile: Tile) -> list[Tile]:
    """The tile split into shard-sized blocks (tiles of a finer grid with the same origin)."""
    _, edge = cube.shard_size(tile.grid.tile_size)
    g = tile.grid
    fine = GridSpec(g.crs, g.resolution, edge, g.origin_x, g.origin_y, g.extent)
    n = g.tile_size // edge
    return [fine.tile(tile.ix * n + i, tile.iy * n + j) for j in range(n) for i in range(n)]


def batches(
    tiles: list[Tile], n_dates: int, n_vars: int, budget_bytes: int = BATCH_BYTES
) -> list[Batch]:
    """(tile, block) pairs grouped so one batch's values fit `budget_bytes` (`ingest.batch_mb`).

    A batch is read date by date with each COG opened once for all its blocks, so larger
    batches mean fewer opens; the bound keeps a worker's memory in check (values are float32,
    and stacking the dates copies them once).
    """
    pairs = [(t, b) for t in tiles for b in blocks(t)]
    per_px = max(n_dates, 1) * n_vars * 4 * 2
    budget = max(1, budget_bytes // per_px)
    out: list[Batch] = [[]]
    used = 0
    for pair in pairs:
        px = pair[1].grid.tile_size ** 2
        if out[-1] and used + px > budget:
            out.append([])
            used = 0
        out[-1].append(pair)
        used += px
    return out if out[0] else []


def read_batch(
    ws: Workspace, modality: str, batch: Batch, days: Days, io: IngestIO
) -> tuple[list[np.datetime64], list[DateResult]]:
    """Read every date touching the batch's blocks; one task per date, all blocks in it."""
    import dask

    tiles = list(dict.fromkeys(t for t, _ in batch))
    mine = {d: [it for it in g if any(_touches(it, t) for t in tiles)] for d, g in days.items()}
    mine = {d: g for d, g in mine.items() if g}
    ing = ws.config.ingest
    plans = item_reads([it for g in mine.values() for it in g], modality, ing.s2_harmonisation)
    geoboxes = tuple(b.geobox for _, b in batch)
    tasks = [
        DateRead(modality, geoboxes, tuple(plans[i.id] for i in g), ing.scl_mask,
                 ing.scl_dilation_px)
        for g in mine.values()
    ]  # fmt: skip
    return list(mine), io.compute([dask.delayed(read_date)(t, io.env) for t in tasks])


# ---------------------------------------------------------------------------- writing


def write_batch(
    url: str,
    modality: str,
    batch: Batch,
    days: list[np.datetime64],
    results: list[DateResult],
    times: np.ndarray,
    outer,
) -> dict[str, list[int]]:
    """Write each block of a batch into the obs cube; (valid, total) pixel-dates per tile."""
    counts: dict[str, list[int]] = {}
    first = MODALITY_VARIABLES[modality][0]
    for k, (tile, block) in enumerate(batch):
        ds = _block_dataset(results, days, block, times, modality, k)
        cube.write_tile(url, ds, block, outer)
        values = ds[first].values
        seen = counts.setdefault(tile.id, [0, 0])
        seen[0] += int(np.isfinite(values).sum())
        seen[1] += values.size
    return counts


def _block_dataset(
    results: list[DateResult],
    days: list[np.datetime64],
    block: Tile,
    times: np.ndarray,
    modality: str,
    k: int,
) -> xr.Dataset:
    """Window `k` of a batch's results on the cube's whole time axis (all-NaN where unread)."""
    import xarray as xr

    if not results:
        shape = (len(times), *block.geobox.shape.yx)
        nan = np.full(shape, np.nan, dtype="float32")
        return xr.Dataset({v: (("time", "y", "x"), nan) for v in MODALITY_VARIABLES[modality]})
    ds = to_dataset(results, np.array(days, dtype="datetime64[ns]"), block.geobox, k)
    return ds.reindex(time=times)


class ObsWriter:
    """Writes batches on one background thread, so a batch's write overlaps the next reads
    (also the next modality's); a tile is marked done once all its blocks are written."""

    def __init__(self, ws: Workspace) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.ws = ws
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="obs-writer")
        self.pending: tuple | None = None

    def submit(self, stage: str, key: str, batch, infos: dict, last_block: dict, *args) -> None:
        """Queue `write_batch(*args)`; first wait for the batch before (one write in flight)."""
        self.drain()
        self.pending = (stage, key, batch, infos, last_block, self.pool.submit(write_batch, *args))

    def drain(self) -> None:
        """Wait for the queued write and mark the tiles whose last block it held."""
        if self.pending is None:
            return
        stage, key, batch, infos, last_block, future = self.pending
        self.pending = None
        for tile_id, (valid, total) in future.result().items():
            counts = infos[tile_id]["_counts"]
            counts[0], counts[1] = counts[0] + valid, counts[1] + total
        for tile, block in batch:
            if last_block[tile.id] is block:
                info = infos[tile.id]
                valid, total = info.pop("_counts")
                info["valid_fraction"] = round(valid / total, 4) if total else 0.0
                info["read_failures"] = _unique(info["read_failures"])
                self.ws.mark_done(stage, tile.id, key, info)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown()


def write_tiles(
    ws: Workspace,
    modality: str,
    tiles: list[Tile],
    days: Days,
    times: np.ndarray,
    key: str,
    io: IngestIO,
) -> list[dict]:
    """Read the tiles batch by batch and queue each batch's write; returns the tiles' infos
    (completed in place when their writes finish)."""
    url, stage, outer = ws.obs_url(modality), f"ingest-{modality}", ws.extent(ws.tiles())
    budget = ws.config.ingest.batch_mb << 20
    plan = batches(tiles, len(times), len(MODALITY_VARIABLES[modality]), budget)
    infos = {t.id: _tile_info(t, days) for t in tiles}
    last_block = {t.id: b for batch in plan for t, b in batch}
    logged: set[str] = set()  # a failed item is logged once, when it first fails
    for batch in track(plan, f"ingest {modality}", total=len(plan)):
        dates, results = read_batch(ws, modality, batch, days, io)
        batch_tiles = {t.id for t, _ in batch}
        for item, why in ((i, w) for r in results for i, w in r.failures):
            if item not in logged:
                logged.add(item)
                run_logger("ingest").warning(
                    kv("ingest.read_failed", modality=modality, item=item, reason=why)
                )
            for t in batch_tiles:
                infos[t]["read_failures"].append({"item": item, "reason": why})
        io.writer.submit(stage, key, batch, infos, last_block,
                         url, modality, batch, dates, results, times, outer)  # fmt: skip
    return [infos[t.id] for t in tiles]


def _tile_info(tile: Tile, days: Days) -> dict:
    """A tile's row before its writes: items and dates touching it; counts filled in later."""
    mine = [[it for it in g if _touches(it, tile)] for g in days.values()]
    return {
        "tile": tile.id,
        "items": sum(len(g) for g in mine),
        "dates": sum(1 for g in mine if g),
        "valid_fraction": 0.0,
        "read_failures": [],
        "_counts": [0, 0],  # valid, total pixel-dates written so far
    }
