"""The region to map as one geometry: a bounding box, a GeoJSON file, a GeoPackage layer or a
place name (tasks/gazetteer.py).

GeoPackages are read with the standard library (sqlite3) and shapely: a GeoPackage geometry is a
small binary header followed by WKB, and the layer's CRS is in `gpkg_spatial_ref_sys`.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import shapely
from odc.geo.geom import Geometry
from odc.geo.geom import box as box_

from pivotmap.tasks.grid import RegionError, Tile

_ENVELOPE_BYTES = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}


def bbox_region(bbox: tuple[float, float, float, float], crs: str) -> Geometry:
    """A bounding box (xmin, ymin, xmax, ymax in `crs`) as a geometry."""
    return box_(*bbox, crs)


def geojson_region(path: str | Path, crs: str = "EPSG:4326") -> Geometry:
    """The union of a GeoJSON file's features (RFC 7946: lon/lat unless `crs` says otherwise)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegionError(
            f"cannot read region GeoJSON {path}: {exc} — check `region.geojson`"
        ) from exc
    features = doc.get("features", [doc]) if isinstance(doc, dict) else []
    geoms = [shapely.geometry.shape(f.get("geometry", f)) for f in features if f]
    geoms = [g for g in geoms if not g.is_empty]
    if not geoms:
        raise RegionError(f"region GeoJSON {path} has no geometry")
    return Geometry(shapely.union_all(geoms), crs=crs)


def geopackage_region(path: str | Path, layer: str | None = None) -> Geometry:
    """The union of a GeoPackage layer's geometries, in the layer's CRS."""
    path = Path(path)
    if not path.is_file():
        raise RegionError(f"region GeoPackage not found: {path} — check `region.geopackage`")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            table, column, srs = _gpkg_layer(con, path, layer)
            blobs = [row[0] for row in con.execute(f'SELECT "{column}" FROM "{table}"') if row[0]]
            crs = _gpkg_crs(con, srs, path)
    except sqlite3.DatabaseError as exc:
        raise RegionError(f"{path} is not a readable GeoPackage: {exc}") from exc
    geoms = [g for g in (_gpkg_geometry(b) for b in blobs) if not g.is_empty]
    if not geoms:
        raise RegionError(f"GeoPackage {path} layer {table!r} has no geometry")
    return Geometry(shapely.union_all(geoms), crs=crs)


def _gpkg_layer(con: sqlite3.Connection, path: Path, layer: str | None) -> tuple[str, str, int]:
    rows = con.execute(
        "SELECT table_name, column_name, srs_id FROM gpkg_geometry_columns ORDER BY table_name"
    ).fetchall()
    if layer is not None:
        rows = [r for r in rows if r[0] == layer]
    if not rows:
        names = [r[0] for r in con.execute("SELECT table_name FROM gpkg_geometry_columns")]
        raise RegionError(
            f"GeoPackage {path} has no feature layer {layer!r} (layers: {names}) — "
            "check `region.layer`"
        )
    return rows[0]


def _gpkg_crs(con: sqlite3.Connection, srs_id: int, path: Path) -> str:
    row = con.execute(
        "SELECT organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys "
        "WHERE srs_id = ?",
        (srs_id,),
    ).fetchone()
    if row is None or srs_id <= 0:
        raise RegionError(f"GeoPackage {path}: layer CRS (srs_id {srs_id}) is undefined")
    org, code, definition = row
    if str(org).upper() == "EPSG":
        return f"EPSG:{code}"
    return definition


def _gpkg_geometry(blob: bytes) -> shapely.Geometry:
    """GeoPackage binary: 'GP', version, flags, srs_id, optional envelope, then WKB."""
    if blob[:2] != b"GP":
        raise RegionError("GeoPackage geometry blob lacks its 'GP' header")
    flags = blob[3]
    envelope = _ENVELOPE_BYTES.get((flags >> 1) & 0b111)
    if envelope is None:
        raise RegionError(f"GeoPackage geometry has an invalid envelope code in flags {flags:#x}")
    struct.unpack("<i" if flags & 1 else ">i", blob[4:8])  # srs_id: the layer's is used
    return shapely.from_wkb(blob[8 + envelope :])


def region_geometry(
    *,
    bbox: tuple[float, float, float, float] | None = None,
    crs: str = "EPSG:4326",
    geojson: str | None = None,
    geopackage: str | None = None,
    layer: str | None = None,
    place: str | None = None,
    place_radius_km: float | None = None,
) -> Geometry:
    """The configured region (exactly one of bbox, geojson, geopackage, place) as a geometry;
    the keywords are RegionConfig's fields."""
    if bbox is not None:
        return bbox_region(bbox, crs)
    if geojson is not None:
        return geojson_region(geojson, crs)
    if geopackage is not None:
        return geopackage_region(geopackage, layer)
    if place is not None:
        from pivotmap.tasks.gazetteer import resolve_place

        return resolve_place(place, place_radius_km).geometry
    raise RegionError(
        "no region given: set region.bbox, region.geojson, region.geopackage or region.place"
    )


def tiles_lonlat(tiles: list[Tile]) -> Geometry:
    """Footprint of the tiles in EPSG:4326 (what catalogues are searched with)."""
    geom = tiles[0].footprint
    for tile in tiles[1:]:
        geom = geom.union(tile.footprint)
    return geom.to_crs("EPSG:4326")
