"""Ingest flow: STAC items → masked, regridded observations on their own dates (`obs` cubes)."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pystac
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from pivotmap.flows.config import RunConfig
from pivotmap.flows.progress import track
from pivotmap.flows.workspace import Workspace
from pivotmap.tasks import cube
from pivotmap.tasks.grid import Tile
from pivotmap.tasks.load import load_s1, load_s2, solar_day
from pivotmap.tasks.sensors import (
    S1_VARIABLES,
    S2_VARIABLES,
    AssetError,
    orbit_state,
    s1_asset_map,
    s2_asset_map,
)
from pivotmap.tasks.stac_source import require_items, search_items

MODALITY_VARIABLES = {"s2": list(S2_VARIABLES), "s1": list(S1_VARIABLES)}


def region_lonlat(tiles: list[Tile]):
    """Footprint of the tiles in EPSG:4326 (what catalogues are searched with)."""
    geom = tiles[0].footprint
    for tile in tiles[1:]:
        geom = geom.union(tile.footprint)
    return geom.to_crs("EPSG:4326")


def screen_items(modality: str, items: list[pystac.Item], config: RunConfig) -> tuple[list, list]:
    """Items fit for the cube, and the others with the reason they were skipped."""
    kept, skipped = [], []
    for item in items:
        reason = _reject_reason(modality, item, config)
        if reason:
            skipped.append({"item": item.id, "reason": reason})
        else:
            kept.append(item)
    return kept, skipped


def _reject_reason(modality: str, item: pystac.Item, config: RunConfig) -> str | None:
    try:
        (s2_asset_map if modality == "s2" else s1_asset_map)(item)
    except AssetError as exc:
        return str(exc)
    if modality == "s2":
        cloud = item.properties.get("eo:cloud_cover")
        if cloud is not None and cloud > config.ingest.max_cloud_cover:
            return f"eo:cloud_cover {cloud:.1f} > max_cloud_cover {config.ingest.max_cloud_cover}"
    wanted = config.ingest.s1_orbit_state
    if modality == "s1" and wanted and orbit_state(item) != wanted:
        return f"orbit {orbit_state(item)} is not {wanted}"
    return None


def items_key(items: list[pystac.Item]) -> str:
    return hashlib.sha256("\n".join(sorted(i.id for i in items)).encode()).hexdigest()[:16]


@task(cache_policy=NONE)
def search_task(
    config: RunConfig, modality: str, collection: str, tiles: list[Tile]
) -> list[pystac.Item]:
    src, period = config.source, config.period
    items = search_items(
        src.kind, src.url, collection, region_lonlat(tiles), period.start, period.end, src.timeout_s
    )
    require_items(items, collection, src.url, period.start, period.end)
    return items


@task(cache_policy=NONE)
def ingest_tile(
    ws: Workspace, modality: str, tile: Tile, items: list[pystac.Item], times: np.ndarray
) -> dict:
    """Load one tile's items of one modality and write them into the obs cube."""
    mine = [it for it in items if _touches(it, tile)]
    if not mine:
        return {"tile": tile.id, "items": 0, "valid_fraction": 0.0}
    if modality == "s2":
        ds = load_s2(mine, tile.geobox, ws.config.ingest.scl_mask)
    else:
        ds = load_s1(mine, tile.geobox)
    ds = ds.reindex(time=times)
    cube.write_tile(ws.obs_url(modality), ds, tile, ws.extent(ws.tiles()))
    valid = float(np.isfinite(ds[MODALITY_VARIABLES[modality][0]].values).mean())
    return {"tile": tile.id, "items": len(mine), "valid_fraction": round(valid, 4)}


def _touches(item: pystac.Item, tile: Tile) -> bool:
    from odc.geo.geom import Geometry

    return item.geometry is None or Geometry(item.geometry, crs="EPSG:4326").intersects(
        tile.footprint.to_crs("EPSG:4326")
    )


@flow(name="ingest")
def ingest_flow(config: RunConfig, out_dir: str, force: bool = False) -> dict:
    """Search both modalities, screen the items and write each tile's observations."""
    started = time.monotonic()
    ws = Workspace.open(config, out_dir)
    tiles = ws.tiles()
    summary: dict = {"stage": "ingest", "tiles": [t.id for t in tiles], "modalities": {}}
    for modality, collection in (
        ("s2", config.source.s2_collection),
        ("s1", config.source.s1_collection),
    ):
        if collection:
            summary["modalities"][modality] = _ingest_modality(
                ws, modality, collection, tiles, force
            )
    summary["duration_s"] = round(time.monotonic() - started, 2)
    ws.write_report("ingest", summary)
    return summary


def _ingest_modality(
    ws: Workspace, modality: str, collection: str, tiles: list[Tile], force: bool
) -> dict:
    logger = get_run_logger()
    found = search_task(ws.config, modality, collection, tiles)
    items, skipped = screen_items(modality, found, ws.config)
    require_items(
        items, collection, ws.config.source.url, ws.config.period.start, ws.config.period.end
    )
    times = np.array(sorted({solar_day(it) for it in items}), dtype="datetime64[ns]")
    key = items_key(items)
    url = ws.obs_url(modality)
    stage = f"ingest-{modality}"
    if force or not all(ws.is_done(stage, t.id, key) for t in tiles):
        if force or not _store_matches(url, key):
            tmpl = cube.template(
                ws.extent(tiles), times, MODALITY_VARIABLES[modality], {"items_key": key}
            )
            cube.create(url, tmpl, ws.config.grid.tile_size)
            ws.clear_stage(stage)
    done, reused = [], []
    for tile in track(tiles, f"ingest {modality}", total=len(tiles)):
        if ws.is_done(stage, tile.id, key):
            reused.append(tile.id)
            continue
        info = ingest_tile(ws, modality, tile, items, times)
        ws.mark_done(stage, tile.id, key, info)
        done.append(info)
    logger.info(
        "%s: %d items kept, %d skipped, %d tiles written",
        modality,
        len(items),
        len(skipped),
        len(done),
    )
    return {
        "collection": collection,
        "items_found": len(found),
        "items_used": len(items),
        "item_ids": [it.id for it in items],
        "skipped_items": skipped,
        "dates": len(times),
        "tiles_written": done,
        "tiles_already_done": reused,
        "cube": url,
    }


def _store_matches(url: str, key: str) -> bool:
    try:
        return cube.open_cube(url).attrs.get("items_key") == key
    except Exception:  # no store yet, or an unreadable one: rebuild it
        return False
