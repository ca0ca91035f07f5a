"""Reference labels on the grid, one tile at a time, from rasters and vector files.

Mapping centres keep reference data as parcels or points (GeoPackage, GeoParquet, FlatGeobuf,
GeoJSON, Shapefile) with a class column, and sometimes as a class raster. Each tile reads only
the features (or raster window) that reach it, so no stage ever holds a country's labels.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import rasterio
import rasterio.errors
import rasterio.features
import shapely
from odc.geo import CRS
from odc.geo.geobox import GeoBox
from odc.geo.geom import box as box_
from rasterio.warp import Resampling, reproject

from pivotmap.tasks import storage
from pivotmap.tasks.nomenclature import Nomenclature, NomenclatureError

if TYPE_CHECKING:
    import geopandas as gpd

    from pivotmap.config import LabelsConfig, LabelSource

UNKNOWN = 0  # internal code for "no reference here"
NO_GROUP = -1  # pixels of rasters and points: no polygon ties them to others

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
PARQUET_SUFFIXES = (".parquet", ".geoparquet")
OGR_SUFFIXES = (".gpkg", ".fgb", ".geojson", ".json", ".shp")
_SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
_POINTS = (0, 4)  # shapely type ids: Point, MultiPoint
_LINES = (1, 2, 5)  # LineString, LinearRing, MultiLineString
_MAX_SAMPLE = 2048  # check_labels reads a raster decimated to at most this edge
_REMOTE_SUFFIXES = (*RASTER_SUFFIXES, *OGR_SUFFIXES, *_SHAPEFILE_PARTS, ".ovr", ".aux.xml")
# GDAL's remote reads are limited to these (the storage defaults allow .tif only).
_GDAL_ENV = {
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(
        _REMOTE_SUFFIXES + tuple(x.upper() for x in _REMOTE_SUFFIXES)
    )
}


class LabelError(ValueError):
    """The label file cannot be read or holds codes the nomenclature does not know."""


@dataclass(frozen=True)
class TileLabels:
    """Reference data on one geobox: class codes, sample weights and split groups per pixel."""

    codes: np.ndarray  # uint8 [h, w]; UNKNOWN where no source labels the pixel
    weight: np.ndarray  # float32 [h, w]; 0 where UNKNOWN
    group: np.ndarray  # int64 [h, w]; a polygon's id (same in every tile), else NO_GROUP

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> TileLabels:
        return cls(
            codes=np.full(shape, UNKNOWN, np.uint8),
            weight=np.zeros(shape, np.float32),
            group=np.full(shape, NO_GROUP, np.int64),
        )


def source_kind(url: str) -> Literal["raster", "vector"]:
    """'raster' or 'vector' from the file suffix; a LabelError for any other suffix."""
    suffix = PurePosixPath(urlparse(url).path if "://" in url else url).suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in PARQUET_SUFFIXES + OGR_SUFFIXES:
        return "vector"
    accepted = ", ".join(RASTER_SUFFIXES + PARQUET_SUFFIXES + OGR_SUFFIXES)
    raise LabelError(
        f"labels {url}: unknown file type {suffix or '(none)'!r}; accepted: {accepted}"
    )


# ---------------------------------------------------------------------------- per tile
def read_tile_labels(
    labels: LabelsConfig,
    geobox: GeoBox,
    nomenclature: Nomenclature,
    years: tuple[int, int] | None = None,
) -> TileLabels:
    """The labels of one tile (or any geobox of the grid) from every source.

    Sources are taken in `labels.all_sources` order and the first source that labels a pixel
    wins (within one vector source, where features overlap the later one in the file wins; a
    feature with a null class or one of the nomenclature's unknown codes labels nothing). Only the features intersecting `geobox` (or the raster window under it) are read,
    so a tile costs the same in a country as in a test. With `years` (inclusive), features of
    a source with a `year_column` outside them are left out (a null year is kept).
    """
    out = TileLabels.empty(tuple(geobox.shape))
    for index, source in enumerate(labels.all_sources):
        layer = _read_source(source, index, geobox, nomenclature, years)
        free = (out.codes == UNKNOWN) & (layer.codes != UNKNOWN)
        out.codes[free] = layer.codes[free]
        out.weight[free] = layer.weight[free]
        out.group[free] = layer.group[free]
        if (out.codes != UNKNOWN).all():
            break
    return out


def read_labels(url: str, geobox: GeoBox, nomenclature: Nomenclature) -> np.ndarray:
    """Class codes of one label raster on `geobox` (nearest neighbour); unknown codes become 0."""
    from pivotmap.config import LabelSource

    return _read_raster(LabelSource(url=url), geobox, nomenclature).codes


def _read_source(
    source: LabelSource,
    index: int,
    geobox: GeoBox,
    nomenclature: Nomenclature,
    years: tuple[int, int] | None,
) -> TileLabels:
    if source_kind(source.url) == "raster":
        return _read_raster(source, geobox, nomenclature)
    return _read_vector(source, index, geobox, nomenclature, years)


# rasterio wraps a destination array in a dataset before giving it `dst_transform`, then warns
# that this dataset has no geotransform: nothing is wrong with the labels (the source's CRS is
# checked first). A filter for the process: `catch_warnings` around the call is not
# thread-safe, and tiles are read on threads.
warnings.filterwarnings(
    "ignore", category=rasterio.errors.NotGeoreferencedWarning, module="rasterio.warp"
)


def _read_raster(source: LabelSource, geobox: GeoBox, nomenclature: Nomenclature) -> TileLabels:
    """Band 1 warped onto `geobox`: GDAL reads only the source window under it."""
    url = source.url
    try:
        with rasterio.Env(**storage.gdal_env(_GDAL_ENV)), rasterio.open(url) as src:
            if src.crs is None:
                raise LabelError(
                    f"label raster {url} has no CRS: assign one (e.g. gdal_edit.py -a_srs)"
                )
            codes = np.zeros(geobox.shape, dtype=np.int32)
            reproject(
                source=rasterio.band(src, 1),
                destination=codes,
                dst_transform=geobox.transform,
                dst_crs=str(geobox.crs),
                dst_nodata=UNKNOWN,
                resampling=Resampling.nearest,
            )
    except rasterio.RasterioIOError as exc:
        raise LabelError(f"cannot read label raster {url}: {exc}") from exc
    check_codes(codes, nomenclature, url)
    codes[np.isin(codes, nomenclature.unknown_codes)] = UNKNOWN
    out = TileLabels.empty(tuple(geobox.shape))
    out.codes[:] = codes
    out.weight[codes != UNKNOWN] = 1.0
    return out


def _read_vector(
    source: LabelSource,
    index: int,
    geobox: GeoBox,
    nomenclature: Nomenclature,
    years: tuple[int, int] | None,
) -> TileLabels:
    """Features reaching the tile, filtered, eroded and burnt (a pixel whose centre they cover)."""
    out = TileLabels.empty(tuple(geobox.shape))
    frame = _features_near(source, geobox)
    frame = _in_years(frame, source, years)
    codes = _class_codes(frame, source)
    check_codes(codes, nomenclature, source.url)
    keep = ~np.isin(codes, [UNKNOWN, *nomenclature.unknown_codes])
    frame, codes = frame[keep], codes[keep]
    if frame.empty:
        return out
    weights = _weights(frame, source)
    groups = _groups(frame, source, index)
    geoms = _on_grid(frame, source, geobox)
    burnt = [(g, i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    if not burnt:
        return out
    which = rasterio.features.rasterize(
        burnt,
        out_shape=geobox.shape,
        transform=geobox.transform,
        fill=0,
        all_touched=False,  # a pixel belongs to the polygon covering its centre
        dtype="int32",
    )
    hit = which > 0
    feature = which[hit] - 1
    out.codes[hit] = codes[feature]
    out.weight[hit] = weights[feature]
    out.group[hit] = groups[feature]
    return out


def _on_grid(frame: gpd.GeoDataFrame, source: LabelSource, geobox: GeoBox) -> np.ndarray:
    """Geometries in the grid CRS, polygons eroded by `buffer_m` (empty when eroded away)."""
    geoms = frame.geometry.to_crs(str(geobox.crs)).to_numpy()
    kinds = shapely.get_type_id(geoms)
    if np.isin(kinds, _LINES).any():
        raise LabelError(
            f"labels {source.url} hold line geometries: give polygons (parcels) or points"
        )
    if source.buffer_m > 0:
        areas = ~np.isin(kinds, _POINTS)
        geoms[areas] = shapely.buffer(geoms[areas], -source.buffer_m)
    return geoms


def _in_years(
    frame: gpd.GeoDataFrame, source: LabelSource, years: tuple[int, int] | None
) -> gpd.GeoDataFrame:
    if not source.year_column or years is None or frame.empty:
        return frame
    raw = frame[source.year_column]
    if pd.api.types.is_datetime64_any_dtype(raw):
        year = raw.dt.year
    else:
        year = pd.to_numeric(raw, errors="coerce")
        if (year.isna() & raw.notna()).any():
            bad = raw[year.isna() & raw.notna()].unique()[:5].tolist()
            raise LabelError(
                f"year column {source.year_column!r} of {source.url} holds non-years {bad}"
            )
    return frame[year.isna() | ((year >= years[0]) & (year <= years[1]))]


def _class_codes(frame: gpd.GeoDataFrame, source: LabelSource) -> np.ndarray:
    """Integer class codes per feature; a null class is UNKNOWN."""
    raw = frame[source.class_column]
    codes = pd.to_numeric(raw, errors="coerce")
    bad = (codes.isna() & raw.notna()) | (codes.notna() & (codes % 1 != 0))
    if bad.any():
        raise LabelError(
            f"class column {source.class_column!r} of {source.url} holds non-integer values "
            f"{raw[bad].unique()[:5].tolist()}: it must hold the nomenclature's integer codes"
        )
    return codes.fillna(UNKNOWN).to_numpy(dtype=np.int64)


def _weights(frame: gpd.GeoDataFrame, source: LabelSource) -> np.ndarray:
    if not source.weight_column:
        return np.ones(len(frame), np.float32)
    weights = pd.to_numeric(frame[source.weight_column], errors="coerce").to_numpy(float)
    bad = ~(weights > 0)  # NaN (null or text) is bad too
    if bad.any():
        raise LabelError(
            f"weight column {source.weight_column!r} of {source.url} has values that are not > 0 "
            f"(features {frame.index[bad][:5].tolist()}): weights must be positive numbers"
        )
    return weights.astype(np.float32)


def _groups(frame: gpd.GeoDataFrame, source: LabelSource, index: int) -> np.ndarray:
    """Stable int64 split groups: the group column's value or the feature id, with the source
    index, hashed; points get NO_GROUP (a point is one pixel)."""
    points = np.isin(shapely.get_type_id(frame.geometry.to_numpy()), _POINTS)
    values = frame[source.group_column] if source.group_column else None
    out = np.full(len(frame), NO_GROUP, np.int64)
    for i, fid in enumerate(frame.index):
        if points[i]:
            continue
        if values is not None and pd.notna(values.iloc[i]):
            out[i] = stable_id(f"{index}\x1fgroup\x1f{values.iloc[i]}")
        else:
            out[i] = stable_id(f"{index}\x1ffid\x1f{fid}")
    return out


def stable_id(key: str) -> int:
    """A non-negative int64 from `key`, the same in every process and run (not Python's hash)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------- vector reading
def _columns(source: LabelSource) -> list[str]:
    named = (source.class_column, source.year_column, source.weight_column, source.group_column)
    return list(dict.fromkeys(c for c in named if c))


def _missing_columns(source: LabelSource, present: list[str]) -> None:
    missing = [c for c in _columns(source) if c not in present]
    if missing:
        raise LabelError(
            f"labels {source.url} have no column {missing[0]!r} (columns: {present}): fix "
            "class_column/year_column/weight_column/group_column of this source"
        )


def _bbox_in(geobox: GeoBox, crs: CRS) -> tuple[float, float, float, float]:
    """The geobox's bbox, one pixel wider, in the source CRS (edges densified when reprojected)."""
    x0, y0, x1, y1 = geobox.boundingbox
    pad = abs(geobox.resolution.x)
    box = box_(x0 - pad, y0 - pad, x1 + pad, y1 + pad, geobox.crs)
    return tuple(box.to_crs(crs).boundingbox)  # type: ignore[return-value]


def _features_near(source: LabelSource, geobox: GeoBox) -> gpd.GeoDataFrame:
    """The features whose envelope meets the geobox, indexed by a stable feature id."""
    if _is_parquet(source.url):
        return _parquet_near(source, geobox)
    import pyogrio

    info = _ogr_info(source)
    _missing_columns(source, list(info["fields"]))
    bbox = _bbox_in(geobox, CRS(info["crs"]))
    try:
        return pyogrio.read_dataframe(
            _ogr_path(source.url),
            layer=source.layer,
            columns=_columns(source),
            bbox=bbox,
            fid_as_index=True,
        )
    except Exception as exc:  # pyogrio's DataSourceError, DataLayerError, ...
        raise LabelError(f"cannot read labels {source.url}: {exc}") from exc


def _ogr_path(url: str) -> str:
    if storage.is_remote(url):
        import pyogrio

        # pyogrio has its own GDAL: give it the same (secret-free) settings as rasterio readers.
        pyogrio.set_gdal_config_options(storage.gdal_env(_GDAL_ENV))
    return url


def _ogr_info(source: LabelSource, count: bool = False) -> dict:
    import pyogrio

    try:
        info = pyogrio.read_info(
            _ogr_path(source.url),
            layer=source.layer,
            force_feature_count=count,
            force_total_bounds=count,
        )
    except Exception as exc:
        raise LabelError(f"cannot read labels {source.url}: {exc}") from exc
    if not info.get("crs"):
        raise LabelError(
            f"labels {source.url} have no CRS: write the file with one (e.g. ogr2ogr -a_srs)"
        )
    return info


def _is_parquet(url: str) -> bool:
    return PurePosixPath(urlparse(url).path if "://" in url else url).suffix.lower() in (
        PARQUET_SUFFIXES
    )


@dataclass(frozen=True)
class _GeoParquet:
    file: object  # pyarrow.parquet.ParquetFile
    geometry: str
    encoding: str
    crs: CRS
    bbox: tuple[float, float, float, float] | None  # from the file's metadata
    covering: dict | None  # GeoParquet 1.1 bbox covering column: row groups can be skipped


def _open_parquet(url: str) -> _GeoParquet:
    import pyarrow.fs
    import pyarrow.parquet as pq

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(
            url if storage.is_remote(url) else str(storage.local_path(url))
        )
        file = pq.ParquetFile(fs.open_input_file(path))
    except Exception as exc:
        raise LabelError(f"cannot read labels {url}: {exc}") from exc
    meta = (file.metadata.metadata or {}).get(b"geo")
    if meta is None:
        raise LabelError(f"labels {url} are Parquet without GeoParquet 'geo' metadata")
    geo = json.loads(meta)
    column = geo["primary_column"]
    info = geo["columns"][column]
    if "crs" in info and info["crs"] is None:
        raise LabelError(f"labels {url} have no CRS (GeoParquet crs: null): write one")
    crs = info.get("crs", "OGC:CRS84")  # GeoParquet: a missing crs means OGC:CRS84
    bbox = info.get("bbox")
    return _GeoParquet(
        file=file,
        geometry=column,
        encoding=info.get("encoding", "WKB"),
        crs=CRS(json.dumps(crs) if isinstance(crs, dict) else crs),
        bbox=tuple(bbox[:2] + bbox[-2:]) if bbox and len(bbox) in (4, 6) else None,
        covering=info.get("covering", {}).get("bbox"),
    )


def _parquet_near(source: LabelSource, geobox: GeoBox) -> gpd.GeoDataFrame:
    """Row groups whose covering bbox meets the tile (all without one), read one at a time and
    kept where a feature's envelope meets it; the row number in the file is the feature id."""
    import geopandas as gpd

    pq = _open_parquet(source.url)
    _missing_columns(source, pq.file.schema_arrow.names)  # type: ignore[attr-defined]
    bbox = _bbox_in(geobox, pq.crs)
    parts = [part[_meets(part.geometry.to_numpy(), bbox)] for part in _row_groups(pq, source, bbox)]
    if not parts:
        return gpd.GeoDataFrame({c: [] for c in _columns(source)}, geometry=[], crs=pq.crs.wkt)
    return pd.concat(parts)


def _row_groups(
    pq: _GeoParquet, source: LabelSource, bbox: tuple[float, float, float, float] | None
) -> Iterator[gpd.GeoDataFrame]:
    import geopandas as gpd

    meta = pq.file.metadata  # type: ignore[attr-defined]
    first = 0
    for i in range(meta.num_row_groups):
        rows = meta.row_group(i).num_rows
        if bbox is None or _group_meets(meta.row_group(i), pq.covering, bbox):
            table = pq.file.read_row_group(i, columns=[pq.geometry, *_columns(source)])  # type: ignore[attr-defined]
            if pq.encoding.upper() == "WKB":
                geoms = shapely.from_wkb(table.column(pq.geometry).to_numpy(zero_copy_only=False))
                frame = table.drop([pq.geometry]).to_pandas()
                frame = gpd.GeoDataFrame(frame, geometry=geoms, crs=pq.crs.wkt)
            else:  # GeoArrow native encodings
                frame = gpd.GeoDataFrame.from_arrow(table, geometry=pq.geometry)
                frame = frame.set_crs(pq.crs.wkt, allow_override=True)
            frame.index = pd.RangeIndex(first, first + rows)
            yield frame
        first += rows


def _group_meets(group, covering: dict | None, bbox: tuple[float, ...]) -> bool:
    """Whether a row group's covering-bbox statistics meet `bbox` (True when unknown)."""
    if not covering:
        return True
    stats = {}
    for j in range(group.num_columns):
        column = group.column(j)
        stats[tuple(column.path_in_schema.split("."))] = column.statistics
    try:
        xmin, ymin = stats[tuple(covering["xmin"])], stats[tuple(covering["ymin"])]
        xmax, ymax = stats[tuple(covering["xmax"])], stats[tuple(covering["ymax"])]
        return not (
            xmin.min > bbox[2] or ymin.min > bbox[3] or xmax.max < bbox[0] or ymax.max < bbox[1]
        )
    except (KeyError, AttributeError, TypeError):  # no statistics written
        return True


def _meets(geoms: np.ndarray, bbox: tuple[float, ...]) -> np.ndarray:
    bounds = shapely.bounds(geoms)
    return ~(
        (bounds[:, 0] > bbox[2])
        | (bounds[:, 1] > bbox[3])
        | (bounds[:, 2] < bbox[0])
        | (bounds[:, 3] < bbox[1])
        | np.isnan(bounds[:, 0])
    )


# ---------------------------------------------------------------------------- checks
def check_codes(labels: np.ndarray, nomenclature: Nomenclature, url: str) -> None:
    """Every code in the labels is a class or an unknown code, else a clear error."""
    present = set(np.unique(labels).tolist()) - {UNKNOWN}
    unknown = sorted(present - set(nomenclature.codes) - set(nomenclature.unknown_codes))
    if unknown:
        raise NomenclatureError(
            f"label file {url} has class codes {unknown} that are not in nomenclature "
            f"{nomenclature.name!r} (codes {nomenclature.codes}): add them or recode the labels"
        )


def check_labels(labels: LabelsConfig, extent: GeoBox, nomenclature: Nomenclature) -> list[dict]:
    """Fail fast before any tile runs: every source readable, with a CRS, its columns, codes the
    nomenclature knows and bounds that overlap `extent`. One summary row per source.

    Nothing is rasterised; a raster's codes are checked on a decimated read (its overviews),
    every tile still checks its own pixels in full.
    """
    rows = []
    for source in labels.all_sources:
        if source_kind(source.url) == "raster":
            row = _check_raster(source)
        elif _is_parquet(source.url):
            row = _check_parquet(source)
        else:
            row = _check_ogr(source)
        check_codes(np.array(row["classes"], dtype=np.int64), nomenclature, source.url)
        row["classes"] = [c for c in row["classes"] if c in nomenclature.codes]
        bounds, crs = row.pop("bounds"), row["crs"]
        _check_overlap(source.url, bounds, crs, extent)
        rows.append(row)
    return rows


def _check_overlap(url: str, bounds: tuple[float, ...], crs: str, extent: GeoBox) -> None:
    x0, y0, x1, y1 = bounds
    footprint = box_(x0, y0, x1, y1, CRS(crs)).to_crs(CRS(str(extent.crs)))
    if not footprint.intersects(extent.extent):
        region = tuple(round(v, 1) for v in extent.boundingbox)
        raise LabelError(
            f"labels {url} do not overlap the region {region} ({extent.crs}) (its bounds "
            f"{tuple(round(v, 4) for v in bounds)} in {crs}): check labels and region"
        )


def _check_raster(source: LabelSource) -> dict:
    try:
        with rasterio.Env(**storage.gdal_env(_GDAL_ENV)), rasterio.open(source.url) as src:
            if src.crs is None:
                raise LabelError(
                    f"label raster {source.url} has no CRS: assign one (e.g. gdal_edit.py -a_srs)"
                )
            scale = max(1, -(-max(src.width, src.height) // _MAX_SAMPLE))
            sample = src.read(
                1, out_shape=(max(1, src.height // scale), max(1, src.width // scale))
            )
            nodata = src.nodata
            crs, bounds, pixels = (
                _crs_name(src.crs.to_wkt()),
                tuple(src.bounds),
                src.width * src.height,
            )
    except rasterio.RasterioIOError as exc:
        raise LabelError(f"cannot read label raster {source.url}: {exc}") from exc
    codes = [int(c) for c in np.unique(sample) if c != UNKNOWN and c != nodata]
    return {
        "url": source.url,
        "kind": "raster",
        "pixels": int(pixels),
        "classes": codes,
        "crs": crs,
        "bounds": bounds,
    }


def _check_ogr(source: LabelSource) -> dict:
    import pyogrio

    info = _ogr_info(source, count=True)
    _missing_columns(source, list(info["fields"]))
    try:
        values = pyogrio.read_dataframe(
            _ogr_path(source.url),
            layer=source.layer,
            columns=[source.class_column],
            read_geometry=False,
        )
    except Exception as exc:
        raise LabelError(f"cannot read labels {source.url}: {exc}") from exc
    return _vector_row(source, values, int(info["features"]), info["crs"], info["total_bounds"])


def _check_parquet(source: LabelSource) -> dict:
    pq = _open_parquet(source.url)
    _missing_columns(source, pq.file.schema_arrow.names)  # type: ignore[attr-defined]
    values = pq.file.read(columns=[source.class_column]).to_pandas()  # type: ignore[attr-defined]
    bounds = pq.bbox
    if bounds is None:  # no bbox in the metadata: one pass over the geometries
        parts = [shapely.bounds(p.geometry.to_numpy()) for p in _row_groups(pq, source, None)]
        every = np.concatenate(parts) if parts else np.full((1, 4), np.nan)
        bounds = (*np.nanmin(every[:, :2], 0), *np.nanmax(every[:, 2:], 0))
    rows = pq.file.metadata.num_rows  # type: ignore[attr-defined]
    return _vector_row(source, values, rows, pq.crs.to_wkt(), bounds)


def _vector_row(source: LabelSource, values: pd.DataFrame, features: int, crs, bounds) -> dict:
    codes = np.unique(_class_codes(values, source))
    return {
        "url": source.url,
        "kind": "vector",
        "features": features,
        "classes": [int(c) for c in codes if c != UNKNOWN],
        "crs": _crs_name(crs),
        "bounds": tuple(float(v) for v in bounds),
    }


def _crs_name(crs) -> str:
    """EPSG:n where the CRS has a code, else its WKT (for summaries)."""
    crs = CRS(crs)
    return f"EPSG:{crs.epsg}" if crs.epsg else crs.to_wkt()


# ---------------------------------------------------------------------------- fingerprint
def labels_fingerprint(labels: LabelsConfig) -> str:
    """sha256 naming the reference data: each source's bytes (local) or URL, size and ETag
    (remote), its column/buffer settings and the nomenclature file (its unknown codes change
    the labels). Cache keys of everything derived from labels use it."""
    digest = hashlib.sha256()
    for source in labels.all_sources:
        settings = source.model_dump(exclude={"url"})
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for url in _files_of(source.url):
            _digest_file(digest, url)
    _digest_file(digest, labels.nomenclature)
    return digest.hexdigest()


def _files_of(url: str) -> list[str]:
    """A Shapefile is several files (its class column lives in the .dbf)."""
    if not url.lower().endswith(".shp"):
        return [url]
    stem = url[:-4]
    parts = [stem + suffix for suffix in _SHAPEFILE_PARTS]
    return [url] + [p for p in parts[1:] if storage.exists(p)]


def _digest_file(digest, url: str) -> None:
    if storage.is_remote(url):
        fs, path = storage._fs(url)
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            raise LabelError(f"labels {url} do not exist") from exc
        stamp = {"url": url, "size": info.get("size"), "etag": info.get("ETag") or info.get("etag")}
        digest.update(json.dumps(stamp, sort_keys=True, default=str).encode())
        return
    path = storage.local_path(url)
    if not path.is_file():
        raise LabelError(f"labels {url} do not exist")
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
