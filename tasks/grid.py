"""The tiling grid: a projected CRS, a resolution, a tile size and an origin; stable tile ids."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

from odc.geo import CRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from odc.geo.geom import box as box_


class RegionError(ValueError):
    """The requested region cannot be mapped on the configured grid."""


@dataclass(frozen=True)
class GridSpec:
    """A regular tiling of a projected CRS; tiles are `tile_size` pixels square.

    Tile (ix, iy) covers x in [origin_x + ix*S, origin_x + (ix+1)*S) and
    y in [origin_y + iy*S, origin_y + (iy+1)*S) with S = tile_size * resolution.
    """

    crs: str
    resolution: float
    tile_size: int
    origin_x: float = 0.0
    origin_y: float = 0.0
    extent: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not CRS(self.crs).projected:
            raise RegionError(
                f"grid crs {self.crs!r} is not projected: use a metric CRS such as EPSG:3035"
            )
        if self.resolution <= 0 or self.tile_size <= 0:
            raise RegionError("grid resolution and tile_size must be positive")

    @property
    def tile_span(self) -> float:
        return self.tile_size * self.resolution

    @property
    def km_ids(self) -> bool:
        """Tile ids in km when every tile corner is on a whole km (EEA-style), else in metres."""
        return all(v % 1000 == 0 for v in (self.origin_x, self.origin_y, self.tile_span))

    def tile(self, ix: int, iy: int) -> Tile:
        return Tile(grid=self, ix=ix, iy=iy)

    def tile_from_id(self, tile_id: str) -> Tile:
        """The tile named `tile_id` (the inverse of `Tile.id`)."""
        match = re.fullmatch(r"E(\d+)(m?)N(\d+)(m?)", tile_id)
        if not match:
            raise RegionError(f"{tile_id!r} is not a tile id (expected e.g. E3600N2890)")
        scale = 1.0 if match.group(2) else 1000.0
        x0, y0 = float(match.group(1)) * scale, float(match.group(3)) * scale
        tile = self.tile(
            round((x0 - self.origin_x) / self.tile_span),
            round((y0 - self.origin_y) / self.tile_span),
        )
        if tile.id != tile_id:
            raise RegionError(f"tile id {tile_id!r} is not a tile of this grid")
        return tile

    def tiles_for_bbox(self, bbox: tuple[float, float, float, float], crs: str) -> list[Tile]:
        """Tiles intersecting `bbox` (given in `crs`), sorted by id; errors if outside `extent`."""
        box = box_(*bbox, CRS(crs)).to_crs(self.crs)
        return self.tiles_for_geometry(box)

    def tiles_for_geometry(self, geom: Geometry) -> list[Tile]:
        """Tiles whose footprint intersects `geom`; the region must overlap the grid extent."""
        geom = geom.to_crs(self.crs)
        if self.extent is not None:
            valid = box_(*self.extent, CRS(self.crs))
            if not geom.intersects(valid):
                raise RegionError(
                    f"region {tuple(round(v, 1) for v in geom.boundingbox)} lies outside the grid's "
                    f"valid extent {self.extent} ({self.crs}); fix `region` or `grid.extent` in the config"
                )
            geom = geom.intersection(valid)
        x0, y0, x1, y1 = geom.boundingbox
        span = self.tile_span
        eps = self.resolution * 1e-6
        ix0 = math.floor((x0 - self.origin_x) / span + eps)
        ix1 = math.ceil((x1 - self.origin_x) / span - eps)
        iy0 = math.floor((y0 - self.origin_y) / span + eps)
        iy1 = math.ceil((y1 - self.origin_y) / span - eps)
        tiles = [
            self.tile(ix, iy)
            for ix in range(ix0, max(ix1, ix0 + 1))
            for iy in range(iy0, max(iy1, iy0 + 1))
        ]
        tiles = [t for t in tiles if t.footprint.intersects(geom) and not t.footprint.touches(geom)]
        if not tiles:
            raise RegionError(f"region {tuple(geom.boundingbox)} covers no tile of the grid")
        return sorted(tiles, key=lambda t: (-t.iy, t.ix))

    def union_geobox(self, tiles: list[Tile]) -> GeoBox:
        """The GeoBox covering the bounding rectangle of `tiles` (the cube's spatial extent)."""
        x0 = min(t.bounds[0] for t in tiles)
        y0 = min(t.bounds[1] for t in tiles)
        x1 = max(t.bounds[2] for t in tiles)
        y1 = max(t.bounds[3] for t in tiles)
        return GeoBox.from_bbox((x0, y0, x1, y1), crs=self.crs, resolution=self.resolution)


@dataclass(frozen=True)
class Tile:
    """One square tile of a grid; `id` names its files, chunk region and STAC item."""

    grid: GridSpec
    ix: int
    iy: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        span = self.grid.tile_span
        x0 = self.grid.origin_x + self.ix * span
        y0 = self.grid.origin_y + self.iy * span
        return (x0, y0, x0 + span, y0 + span)

    @property
    def id(self) -> str:
        """`E3600N2890` (lower-left corner in km) on km-aligned grids, else `E501360mN5629040m`."""
        x0, y0 = self.bounds[:2]
        if self.grid.km_ids:
            return f"E{int(x0 // 1000):04d}N{int(y0 // 1000):04d}"
        return f"E{round(x0)}mN{round(y0)}m"

    @cached_property
    def geobox(self) -> GeoBox:
        return GeoBox.from_bbox(self.bounds, crs=self.grid.crs, resolution=self.grid.resolution)

    @property
    def footprint(self) -> Geometry:
        return box_(*self.bounds, CRS(self.grid.crs))

    def slices_in(self, outer: GeoBox) -> tuple[slice, slice]:
        """(row, col) slices of this tile inside `outer`, a GeoBox on the same grid."""
        ox, oy = outer.transform.c, outer.transform.f
        x0, _, _, y1 = self.bounds
        col = round((x0 - ox) / self.grid.resolution)
        row = round((oy - y1) / self.grid.resolution)
        n = self.grid.tile_size
        return slice(row, row + n), slice(col, col + n)
