"""Zarr v3 storage of the observation and pivotal cubes: CF encoding, sharding, region writes.

A cube is created once for the whole region (metadata only, `compute=False`), then each tile
writes its own region; tile edges are shard edges, so tiles never write the same object.
Only Zarr v3 core codecs are used (sharding_indexed, transpose, bytes, blosc), so TensorStore,
zarrs and zarr-python all read the cubes: within a chunk the chain transposes to time-last (a
pixel's series is contiguous) and blosc byte-shuffles the int16 codes before zstd, at the
pivot's `pivot.zstd_level` (3: writing at 5 took 90 % of a pivot block's time for 10 % fewer
bytes on real data). `LAYOUT_VERSION` names
this storage layout; it is part of the ingest and pivot keys, so a cube written with another
one (the numcodecs delta filters before layout 2) is rebuilt, never appended to.

The pivot is written in raw int16 blocks (`write_block`); new days are written past the visible
time axis through an extended-shape handle and become visible together in one final write of
the root metadata (`publish_days`), so a reader never sees a half-written day.

Every model reads the pivot through `PivotReader` (windows and scattered pixels, float32 or raw
int16) and walks tiles with `iter_windows`; local paths and `s3://` URLs alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

from pivotmap.tasks.grid import Tile
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

FILL = -32768
_ENCODING_ATTRS = ("_FillValue", "scale_factor", "add_offset")  # consumed by decoding


@dataclass(frozen=True)
class VarSpec:
    """int16 encoding and CF attributes of one cube variable."""

    scale: float
    units: str
    long_name: str


VARIABLES: dict[str, VarSpec] = {
    **{b: VarSpec(1e-4, "1", f"Sentinel-2 L2A surface reflectance {b}") for b in S2_VARIABLES},
    **{p: VarSpec(0.01, "dB", f"Sentinel-1 {p} backscatter") for p in S1_VARIABLES},
    "age_s2": VarSpec(1.0, "days", "days to the nearest valid Sentinel-2 observation"),
    "age_s1": VarSpec(1.0, "days", "days to the nearest valid Sentinel-1 observation"),
}


LAYOUT_VERSION = "2"  # bump when codecs or chunking change: the stages rebuild older cubes


@dataclass(frozen=True)
class Layout:
    """How a cube is chunked and compressed (the obs and the pivot cube differ)."""

    time_chunk: int | None = None  # None: the whole time axis in one chunk
    zstd_level: int = 3
    blosc_block: int = 0  # bytes per blosc block (0: blosc's own choice); see pivot_layout


OBS_LAYOUT = Layout()


def pivot_layout(time_chunk_days: int | None, n_days: int, zstd_level: int = 3) -> Layout:
    """The pivot's layout: time chunks of `time_chunk_days` (default: the first build's length,
    so no chunk is padded), kept when days are appended; zstd at `zstd_level` over one blosc
    block per chunk (a year of 32² pixels): zstd then sees whole series, 10 % smaller than
    blosc's 256 KiB blocks."""
    return Layout(
        time_chunk=time_chunk_days or max(n_days, 32), zstd_level=zstd_level, blosc_block=1 << 20
    )


def template(geobox: GeoBox, times: np.ndarray, variables: list[str], attrs: dict) -> xr.Dataset:
    """A lazy all-NaN cube over `geobox` and `times`, with CF coordinates and attributes."""
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    for dim in ("x", "y"):
        coords[dim].attrs.update(axis_attrs(geobox, dim))
    coords["time"] = xr.DataArray(
        np.asarray(times, dtype="datetime64[ns]"),
        dims="time",
        attrs={"axis": "T", "standard_name": "time", "long_name": "time"},
    )
    shape = (len(times), *geobox.shape)
    data = {}
    for name in variables:
        spec = VARIABLES[name]
        arr = da.full(shape, np.nan, dtype="float32", chunks=(len(times), *geobox.shape))
        data[name] = xr.DataArray(
            arr,
            dims=("time", "y", "x"),
            attrs={"units": spec.units, "long_name": spec.long_name, "grid_mapping": "spatial_ref"},
        )
    return xr.Dataset(data, coords=coords, attrs={**geozarr_attrs(geobox), **attrs})


# GeoZarr's `spatial:` and `proj:` conventions (zarr-conventions v1), as geozarr-toolkit checks them
GEOZARR_CONVENTIONS = [
    {
        "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
        "name": "spatial:",
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
        "description": "Spatial coordinate information",
    },
    {
        "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
        "name": "proj:",
        "schema_url": "https://raw.githubusercontent.com/zarr-experimental/geo-proj/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-experimental/geo-proj/blob/v1/README.md",
        "description": "Coordinate reference system information for geospatial data",
    },
]


def geozarr_attrs(geobox: GeoBox) -> dict:
    """GeoZarr group attributes: the grid (affine, bbox, shape) and its CRS, beside CF's
    `spatial_ref`, so GeoZarr readers place the cube without parsing WKT."""
    crs = geobox.crs
    epsg = crs.epsg if crs is not None else None
    proj = {"proj:code": f"EPSG:{epsg}"} if epsg else {"proj:wkt2": crs.to_wkt() if crs else ""}
    return {
        "zarr_conventions": GEOZARR_CONVENTIONS,
        "spatial:dimensions": ["y", "x"],
        "spatial:transform_type": "affine",
        "spatial:transform": list(geobox.affine)[:6],
        "spatial:bbox": list(geobox.extent.boundingbox),
        "spatial:shape": list(geobox.shape),
        "spatial:registration": "pixel",
        **proj,
    }


def axis_attrs(geobox: GeoBox, dim: str) -> dict:
    """CF `axis`, `standard_name` and `long_name` of the x or y coordinate (cf_xarray finds them)."""
    axis = dim.upper()
    if geobox.crs is not None and geobox.crs.geographic:
        name = "longitude" if dim == "x" else "latitude"
        return {"axis": axis, "standard_name": name, "long_name": name}
    return {
        "axis": axis,
        "standard_name": f"projection_{dim}_coordinate",
        "long_name": f"{dim} coordinate of projection",
    }


def encoding(ds: xr.Dataset, chunk_xy: int, shard_xy: int, layout: Layout = OBS_LAYOUT) -> dict:
    """int16 + scale_factor, time-contiguous chunks, shards of `shard_xy` pixels, byte shuffle +
    zstd: Zarr v3 core codecs only."""
    from zarr.codecs import BloscCodec, TransposeCodec

    n_time = layout.time_chunk or ds.sizes["time"]
    enc = {}
    for name in ds.data_vars:
        spec = VARIABLES[str(name)]
        enc[name] = {
            "dtype": "int16",
            "scale_factor": spec.scale,
            "add_offset": 0.0,
            "_FillValue": FILL,
            "fill_value": FILL,
            "chunks": (n_time, chunk_xy, chunk_xy),
            "shards": (n_time, shard_xy, shard_xy),
            "filters": [TransposeCodec(order=(1, 2, 0))],
            "compressors": [
                BloscCodec(
                    cname="zstd",
                    clevel=layout.zstd_level,
                    shuffle="shuffle",  # high bytes apart from low: smooth series compress
                    typesize=2,
                    blocksize=layout.blosc_block,
                )
            ],
        }
    enc["time"] = {
        "units": "days since 1970-01-01",
        "calendar": "proleptic_gregorian",
        "dtype": "int32",
    }
    if layout.time_chunk:
        enc["time"]["chunks"] = (layout.time_chunk,)
    return enc


def shard_size(tile_size: int) -> tuple[int, int]:
    """(chunk, shard) edge in pixels: the shard divides the tile so tile writes never overlap."""
    shard = tile_size
    while shard > 256 and shard % 2 == 0:
        shard //= 2
    chunk = 32 if shard % 32 == 0 else shard
    return chunk, shard


def create(
    url: str,
    tmpl: xr.Dataset,
    tile_size: int,
    storage_options: dict | None = None,
    layout: Layout = OBS_LAYOUT,
    chunk_per_shard: bool = False,
) -> None:
    """Write the cube's metadata and coordinates (no data) at `url`, replacing any cube there.

    `chunk_per_shard` makes the inner chunk the whole shard: right for cubes that are only ever
    read tile by tile (the obs cubes), where small inner chunks add per-chunk work.
    """
    chunk, shard = shard_size(tile_size)
    chunk = shard if chunk_per_shard else chunk
    with quiet_zarr():
        tmpl.to_zarr(
            url,
            mode="w",
            compute=False,
            zarr_format=3,
            consolidated=True,
            encoding=encoding(tmpl, chunk, shard, layout),
            storage_options=storage_options,
        )


def write_tile(
    url: str, ds: xr.Dataset, tile: Tile, outer: GeoBox, storage_options: dict | None = None
) -> None:
    """Write one tile's data (dims time, y, x on the tile's GeoBox) into its region of the cube."""
    rows, cols = tile.slices_in(outer)
    payload = ds.drop_vars([c for c in ds.coords], errors="ignore")
    try:
        with quiet_zarr():
            payload.to_zarr(
                url,
                region={"time": slice(None), "y": rows, "x": cols},
                mode="r+",
                zarr_format=3,
                storage_options=storage_options,
            )
    except OSError as exc:  # a full or read-only disk: name the cube, not only the errno
        if exc.filename:
            raise
        raise OSError(
            exc.errno, f"{exc.strerror or exc} (writing tile {tile.id} to {url})"
        ) from exc


def open_cube(url: str, storage_options: dict | None = None) -> xr.Dataset:
    """Open a cube lazily without dask: indexing a window reads only the shards it touches."""
    with quiet_zarr():
        return xr.open_zarr(url, consolidated=True, chunks=None, storage_options=storage_options)


class PivotReader:
    """The pivot cube opened once, undecoded; windows and pixels are decoded per read to float32
    (CF decoding of int16 + scale_factor from JSON attributes would give float64)."""

    def __init__(self, url: str):
        self.url = url
        with quiet_zarr():
            self._raw = xr.open_zarr(url, consolidated=True, chunks=None, mask_and_scale=False)
        self.times: np.ndarray = self._raw.time.values
        self.sizes: dict[str, int] = {str(k): int(v) for k, v in self._raw.sizes.items()}

    def window(
        self, rows: slice, cols: slice, step_days: int = 1, dtype: str = "float32"
    ) -> xr.Dataset:
        """All variables over a window (dims time, y, x) on the days `times[::step_days]`."""
        return self._read(dict(y=rows, x=cols), step_days, dtype)

    def points(
        self, rows: np.ndarray, cols: np.ndarray, step_days: int = 1, dtype: str = "float32"
    ) -> xr.Dataset:
        """All variables at scattered pixels (dims time, pixel) on the days `times[::step_days]`."""
        pixels = {
            "y": xr.DataArray(np.asarray(rows), dims="pixel"),
            "x": xr.DataArray(np.asarray(cols), dims="pixel"),
        }
        return self._read(pixels, step_days, dtype)

    def _read(self, where: dict, step_days: int, dtype: str) -> xr.Dataset:
        if dtype not in ("float32", "int16"):
            raise ValueError(f"PivotReader reads float32 or raw int16, not {dtype!r}")
        with quiet_zarr():
            raw = self._raw.isel({**where, "time": slice(0, None, step_days)}).load()
        raw = raw.drop_vars("spatial_ref", errors="ignore")
        if dtype == "int16":
            return raw
        return xr.Dataset(
            {name: (var.dims, _decode(var), _decoded_attrs(var)) for name, var in raw.items()},
            coords=raw.coords,
        )


def _decode(var: xr.DataArray) -> np.ndarray:
    """float32 values (NaN for fill values) of an undecoded int16 variable."""
    attrs = var.attrs
    return decode_codes(
        np.asarray(var.values, dtype=np.int16),
        float(attrs.get("scale_factor", 1.0)),
        attrs.get("_FillValue"),
        float(attrs.get("add_offset", 0.0)),
    )


def decode_codes(
    codes: np.ndarray, scale: float, fill: int | None = FILL, offset: float = 0.0
) -> np.ndarray:
    """float32 values (NaN for `fill`) of int16 codes, rounded once from the exact CF value, as
    xarray's float64 decoding then a float32 cast gives (float32 arithmetic would round the
    scale first and differ by an ulp). One lookup table of the 65536 codes: no float64 array of
    the codes' size is ever built."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.int16)  # indexed by the bit pattern
    table = (every * scale + offset).astype(np.float32)
    if fill is not None:
        table[every == fill] = np.nan
    return table[np.asarray(codes, dtype=np.int16).view(np.uint16)]


def _decoded_attrs(var: xr.DataArray) -> dict:
    return {k: v for k, v in var.attrs.items() if k not in _ENCODING_ATTRS}


def iter_windows(
    rows: tuple[int, int], cols: tuple[int, int], size: int
) -> Iterator[tuple[slice, slice]]:
    """Absolute (rows, cols) slices of `size`-pixel windows covering a span, row by row."""
    for r in range(rows[0], rows[1], size):
        for c in range(cols[0], cols[1], size):
            yield slice(r, min(r + size, rows[1])), slice(c, min(c + size, cols[1]))


def open_group(url: str, storage_options: dict | None = None, mode: Literal["r", "r+"] = "r+"):
    """The cube's Zarr group (local path or `s3://`; S3 endpoint and keys from the environment)."""
    import zarr

    with quiet_zarr():
        return zarr.open_group(
            url, mode=mode, storage_options=storage_options, use_consolidated=False
        )


def read_block(group, names: list[str], rows: slice, cols: slice) -> dict[str, np.ndarray]:
    """Decoded float32 values (NaN where missing) of `names` in one spatial window, all dates."""
    out = {}
    for name in names:
        arr = group[name]
        with quiet_zarr():
            raw = arr[:, rows, cols]
        scale = float(arr.attrs.get("scale_factor", 1.0))
        offset = float(arr.attrs.get("add_offset", 0.0))
        values = raw.astype(np.float32) * np.float32(scale) + np.float32(offset)
        out[name] = np.where(raw == arr.attrs.get("_FillValue", FILL), np.nan, values)
    return out


def write_block(
    group, encoded: dict[str, np.ndarray], first_day: int, rows: slice, cols: slice, n_days: int
) -> None:
    """Write int16 blocks (time from `first_day`) into a cube whose time axis becomes `n_days`.

    Days past the visible axis go through an extended-shape handle: their chunks exist on
    storage but readers see them only after `publish_days`.
    """
    for name, block in encoded.items():
        arr = _with_days(group[name], n_days)
        with quiet_zarr():
            arr[first_day : first_day + block.shape[0], rows, cols] = block


def publish_days(group, times: np.ndarray, attrs: dict) -> None:
    """Grow the time axis to `times`, set the cube attributes, then switch the root metadata.

    Variable and coordinate metadata are written first; the consolidated root metadata (what
    `xr.open_zarr` reads) is written last, in one object: the new days appear all at once.
    """
    import zarr

    n_days = len(times)
    days = (np.asarray(times, dtype="datetime64[D]") - np.datetime64("1970-01-01", "D")).astype(
        "int32"
    )
    with quiet_zarr():
        for name, arr in group.arrays():
            if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "time":
                if name == "time":
                    _with_days(arr, n_days)[:] = days
                if arr.shape[0] != n_days:
                    arr.resize((n_days, *arr.shape[1:]))
        group.update_attributes(attrs)
        zarr.consolidate_metadata(group.store_path.store, path=group.store_path.path or None)


def _with_days(arr, n_days: int):
    """`arr` itself, or a handle that sees `n_days` along time without saving that shape."""
    import zarr
    from zarr.core.array import AsyncArray

    if arr.shape[0] == n_days:
        return arr
    meta = arr.metadata.update_shape((n_days, *arr.shape[1:]))
    return zarr.Array(AsyncArray(meta, arr.store_path, arr._async_array.config))


# zarr-python warns at every open of consolidated Zarr v3 metadata, which pivotmap writes on
# purpose (one read opens a cube; readers without it read the group's members): a filter for the
# process, since `catch_warnings` is not thread-safe and S1 and S2 cubes are opened on threads.
warnings.filterwarnings("ignore", message=".*onsolidated metadata.*", module="zarr")


class quiet_zarr(warnings.catch_warnings):
    """Silence zarr-python where pivotmap knows better: the consolidated metadata it writes, and
    the numcodecs delta filters of cubes from before layout 2, opened only to be rebuilt."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        warnings.filterwarnings("ignore", message=".*onsolidated metadata.*")
        return self
