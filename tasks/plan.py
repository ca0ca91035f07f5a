"""What a run will cost, from its config, item metadata and measured rates; no pixel is read.

Pure functions: tiles are counted on the grid (vectorised, so a country on a fine grid counts
in seconds), items are summarised from their STAC metadata (`file:size`, footprints), and every
figure is a quantity times a rate of `pivotmap.rates`, reported with that rate and its source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pystac
import shapely
from odc.geo import CRS
from odc.geo.geom import Geometry
from odc.geo.geom import box as box_

from pivotmap.rates import Rate
from pivotmap.tasks.grid import GridSpec, RegionError
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES, AssetError, s1_asset_map, s2_layout

REVISIT_DAYS = {"s2": 5, "s1": 6}  # one satellite pair each, at mid latitudes
SCENE_KM2 = {"s2": 100.0 * 100.0, "s1": 250.0 * 170.0}  # MGRS granule; one IW slice
OBS_VARIABLES = {"s2": len(S2_VARIABLES), "s1": len(S1_VARIABLES)}
STAGES = ("ingest", "pivot", "sample", "train", "predict", "publish")
_BOXES_PER_CHUNK = 500_000  # bounds the memory of counting tiles of a country on a fine grid


@dataclass(frozen=True)
class TileCover:
    """The tiles of a region: how many, their pixels, and their union (what ingest searches)."""

    tiles: int
    pixels: int
    footprint: Geometry


@dataclass(frozen=True)
class Observations:
    """What one modality brings: items, dates, observations per pixel and bytes to read."""

    modality: str
    items: int
    dates: int
    per_pixel: float  # acquisitions seen by an average pixel of the tiles
    bytes_read: int | None  # from `file:size`; None: to be estimated from a rate
    basis: str  # where the figures come from: the catalogue or an assumed revisit


def tile_cover(spec: GridSpec, geom: Geometry) -> TileCover:
    """The tiles `GridSpec.tiles_for_geometry` gives, counted without building a Tile each."""
    geom = geom.to_crs(spec.crs)
    if spec.extent is not None:
        valid = box_(*spec.extent, CRS(spec.crs))
        if not geom.intersects(valid):
            spec.tiles_for_geometry(geom)  # raises the grid's own error, naming the extent
        geom = geom.intersection(valid)
    ix, iy = _index_ranges(spec, geom.boundingbox)
    span = spec.tile_span
    shape = geom.geom
    if _is_grid_rectangle(shape):
        n = len(ix) * len(iy)
        x0, y0 = spec.origin_x + ix[0] * span, spec.origin_y + iy[0] * span
        union = shapely.box(x0, y0, x0 + len(ix) * span, y0 + len(iy) * span)
    else:
        n, union = _count_boxes(spec, shape, ix, iy)
    if n == 0:
        raise RegionError(f"region {tuple(geom.boundingbox)} covers no tile of the grid")
    return TileCover(n, n * spec.tile_size**2, Geometry(union, crs=spec.crs))


def _index_ranges(spec: GridSpec, bounds) -> tuple[range, range]:
    """Tile column and row indices meeting `bounds` (the same arithmetic as the grid's)."""
    x0, y0, x1, y1 = bounds
    span, eps = spec.tile_span, spec.resolution * 1e-6
    ix0 = math.floor((x0 - spec.origin_x) / span + eps)
    ix1 = math.ceil((x1 - spec.origin_x) / span - eps)
    iy0 = math.floor((y0 - spec.origin_y) / span + eps)
    iy1 = math.ceil((y1 - spec.origin_y) / span - eps)
    return range(ix0, max(ix1, ix0 + 1)), range(iy0, max(iy1, iy0 + 1))


def _is_grid_rectangle(shape: shapely.Geometry) -> bool:
    """An axis-aligned rectangle meets every tile of its index ranges: no test per tile."""
    return bool(shape.geom_type == "Polygon" and shape.equals(shapely.box(*shape.bounds)))


def _count_boxes(
    spec: GridSpec, shape: shapely.Geometry, ix: range, iy: range
) -> tuple[int, shapely.Geometry]:
    """Tiles meeting `shape` (intersecting, not only touching), tested in vectorised chunks."""
    shapely.prepare(shape)
    span = spec.tile_span
    xs = spec.origin_x + np.arange(ix.start, ix.stop) * span
    rows_per_chunk = max(1, _BOXES_PER_CHUNK // len(xs))
    count, parts = 0, []
    for start in range(iy.start, iy.stop, rows_per_chunk):
        ys = spec.origin_y + np.arange(start, min(start + rows_per_chunk, iy.stop)) * span
        gx, gy = np.meshgrid(xs, ys)
        boxes = shapely.box(gx.ravel(), gy.ravel(), gx.ravel() + span, gy.ravel() + span)
        hit = boxes[shapely.intersects(shape, boxes) & ~shapely.touches(shape, boxes)]
        count += len(hit)
        if len(hit):
            parts.append(shapely.coverage_union_all(hit))
    return count, shapely.union_all(parts) if parts else shapely.Polygon()


# ---------------------------------------------------------------------------- items


def observations(modality: str, items: list[pystac.Item], region_lonlat: Geometry) -> Observations:
    """Items found in the catalogue: dates, observations per pixel and `file:size` bytes.

    Ingest mosaics the items of one day, so a pixel's observations are the days whose items'
    footprints cover it: per day, the union of its footprints ∩ region over the region's area.
    The bytes read of an item are its assets' sizes times the share of its footprint inside the
    region (ingest reads windows). Areas are in degrees: ratios, fine at a country's scale.
    """
    region = shapely.simplify(region_lonlat.geom, 0.002)  # ~200 m: keeps thousands of tests fast
    shapely.prepare(region)
    area = max(region.area, 1e-12)
    days: dict[str, list[shapely.Geometry]] = {}
    total, sized = 0.0, True
    for item in items:
        footprint = _footprint(item, region)
        days.setdefault(_day(item), []).append(footprint)
        sizes = [_file_size(item, key) for key in read_assets(modality, item)]
        sized = sized and bool(sizes) and None not in sizes
        total += sum(s or 0 for s in sizes) * _inside_share(footprint, region)
    per_pixel = sum(_inside_area(shapely.union_all(f), region) for f in days.values()) / area
    return Observations(
        modality, len(items), len(days), per_pixel, round(total) if sized and items else None,
        "catalogue search (file:size of the assets ingest reads)" if sized else
        "catalogue search (items lack file:size: bytes estimated)",
    )  # fmt: skip


def assumed_observations(modality: str, days: int, area_km2: float) -> Observations:
    """Without the catalogue: one acquisition every `REVISIT_DAYS` days per pixel, and one item
    per date and scene footprint (`SCENE_KM2`); overlaps of orbits and granules are ignored."""
    dates = math.ceil(days / REVISIT_DAYS[modality])
    scenes = max(1, math.ceil(area_km2 / SCENE_KM2[modality]))
    return Observations(
        modality, dates * scenes, dates, float(dates), None,
        f"offline: assumed revisit of {REVISIT_DAYS[modality]} days, one item per "
        f"{SCENE_KM2[modality]:.0f} km² and date",
    )  # fmt: skip


def read_assets(modality: str, item: pystac.Item) -> list[str]:
    """The asset keys ingest reads of an item: S2 bands and SCL, or S1 VV and VH."""
    try:
        amap = s2_layout(item) if modality == "s2" else s1_asset_map(item)
    except AssetError:
        return []
    return [*amap.variables.values(), *([amap.mask] if amap.mask else [])]


def _file_size(item: pystac.Item, key: str) -> int | None:
    asset = item.assets.get(key)
    size = asset.extra_fields.get("file:size") if asset is not None else None
    return int(size) if isinstance(size, int | float) else None


def _footprint(item: pystac.Item, region: shapely.Geometry) -> shapely.Geometry:
    """The item's footprint; an item without geometry is taken to cover the region."""
    return region if item.geometry is None else shapely.geometry.shape(item.geometry)


def _inside_area(footprint: shapely.Geometry, region: shapely.Geometry) -> float:
    if shapely.contains_properly(region, footprint):
        return footprint.area
    return shapely.intersection(footprint, region).area


def _inside_share(footprint: shapely.Geometry, region: shapely.Geometry) -> float:
    """The share of an item's footprint inside the region (1 for a footprint without area)."""
    return _inside_area(footprint, region) / footprint.area if footprint.area else 1.0


def _day(item: pystac.Item) -> str:
    when = item.datetime or item.common_metadata.start_datetime
    return when.date().isoformat() if when else item.id


# ---------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Sizing:
    """The quantities rates are multiplied by."""

    pixels: int
    days: int
    pivot_variables: int
    train_pixel_epochs: float
    obs: Mapping[str, Observations]
    pivot_method: str = "nearest"  # `pivot.method`: the pivot's bytes per value depend on it


def figure(quantity: float, rate: Rate, divide: bool) -> dict:
    """quantity ÷ rate (a throughput) or × rate (a cost per unit), with the rate named."""
    value = None
    if rate.value is not None:
        value = quantity / rate.value if divide else quantity * rate.value
    return {"value": value, "quantity": quantity, "rate": rate.value, "unit": rate.unit,
            "source": rate.source}  # fmt: skip


def stage_costs(size: Sizing, rates: Mapping[str, Rate]) -> dict[str, dict]:
    """Core-hours (and GPU-hours where a GPU rate is known) of each stage."""
    pixel_dates = sum(size.pixels * o.per_pixel for o in size.obs.values())
    pixel_days = size.pixels * size.days
    core_s = {
        "ingest": figure(pixel_dates, rates["ingest"], divide=True),
        "pivot": figure(pixel_days, rates["pivot"], divide=True),
        "sample": figure(size.pixels, rates["sample"], divide=True),
        "train": figure(size.train_pixel_epochs, rates["train"], divide=False),
        "predict": figure(pixel_days, rates["predict"], divide=True),
        "publish": figure(size.pixels, rates["publish"], divide=True),
    }
    gpu_s = {
        "train": figure(size.train_pixel_epochs, rates["train_gpu"], divide=False),
        "predict": figure(pixel_days, rates["predict_gpu"], divide=True),
    }
    out = {}
    for stage in STAGES:
        cpu = core_s[stage]
        gpu = gpu_s.get(stage)
        out[stage] = {
            "core_hours": _hours(cpu["value"]),
            "cpu": cpu,
            "gpu_hours": _hours(gpu["value"]) if gpu else None,
            "gpu": gpu,
        }
    return out


def storage(size: Sizing, rates: Mapping[str, Rate]) -> dict[str, dict]:
    """Bytes to read from the source and bytes written: obs cubes, pivot cube, products."""
    out: dict[str, dict] = {}
    for m, o in size.obs.items():
        if o.bytes_read is not None:
            out[f"read_{m}"] = {"value": o.bytes_read, "quantity": o.items, "rate": None,
                                "unit": "bytes (file:size)", "source": o.basis}  # fmt: skip
        else:
            out[f"read_{m}"] = figure(size.pixels * o.per_pixel, rates[f"input_bytes_{m}"], False)
            out[f"read_{m}"]["estimated"] = True
        values = size.pixels * o.per_pixel * OBS_VARIABLES[m]
        out[f"obs_cube_{m}"] = figure(values, rates[f"obs_bytes_{m}"], divide=False)
    values = size.pixels * size.days * size.pivot_variables
    out["pivot_cube"] = figure(values, rates[f"pivot_bytes_{size.pivot_method}"], divide=False)
    out["products"] = figure(size.pixels, rates["products_bytes"], divide=False)
    return out


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600.0


def totals(costs: dict[str, dict], stored: dict[str, dict]) -> dict:
    """Core-hours and GPU-hours summed over measured stages (the others named), bytes written."""
    measured = [s for s, c in costs.items() if c["core_hours"] is not None]
    gpu = [s for s, c in costs.items() if c["gpu_hours"] is not None]
    written = [k for k in stored if not k.startswith("read_")]
    return {
        "core_hours": sum(costs[s]["core_hours"] for s in measured),
        "core_hours_not_measured": [s for s in costs if s not in measured],
        "gpu_hours": sum(costs[s]["gpu_hours"] for s in gpu) if gpu else None,
        "bytes_read": sum(v["value"] or 0 for k, v in stored.items() if k.startswith("read_")),
        "storage_bytes": sum(stored[k]["value"] or 0 for k in written),
    }
