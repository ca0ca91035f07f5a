"""Zarr v3 storage of the observation and pivotal cubes: CF encoding, sharding, region writes.

A cube is created once for the whole region (metadata only, `compute=False`), then each tile
writes its own region; tile edges are shard edges, so tiles never write the same object.
Within a chunk the codec chain transposes to time-last and delta-encodes along time before
zstd: a pixel's series is contiguous and interpolated days compress to almost nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

from pivotmap.tasks.grid import Tile
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

FILL = -32768


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


def template(geobox: GeoBox, times: np.ndarray, variables: list[str], attrs: dict) -> xr.Dataset:
    """A lazy all-NaN cube over `geobox` and `times`, with CF coordinates and attributes."""
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    coords["time"] = xr.DataArray(np.asarray(times, dtype="datetime64[ns]"), dims="time")
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
    return xr.Dataset(data, coords=coords, attrs=attrs)


def encoding(ds: xr.Dataset, chunk_xy: int, shard_xy: int) -> dict:
    """int16 + scale_factor, full time per chunk, shards of `shard_xy` pixels, time-delta + zstd."""
    from zarr.codecs import TransposeCodec, ZstdCodec
    from zarr.codecs.numcodecs import Delta

    n_time = ds.sizes["time"]
    enc = {}
    for name in ds.data_vars:
        spec = VARIABLES[name]
        enc[name] = {
            "dtype": "int16",
            "scale_factor": spec.scale,
            "add_offset": 0.0,
            "_FillValue": FILL,
            "fill_value": FILL,
            "chunks": (n_time, chunk_xy, chunk_xy),
            "shards": (n_time, shard_xy, shard_xy),
            "filters": [TransposeCodec(order=(1, 2, 0)), Delta(dtype="int16")],
            "compressors": [ZstdCodec(level=3)],
        }
    enc["time"] = {
        "units": "days since 1970-01-01",
        "calendar": "proleptic_gregorian",
        "dtype": "int32",
    }
    return enc


def shard_size(tile_size: int) -> tuple[int, int]:
    """(chunk, shard) edge in pixels: the shard divides the tile so tile writes never overlap."""
    shard = tile_size
    while shard > 256 and shard % 2 == 0:
        shard //= 2
    chunk = 32 if shard % 32 == 0 else shard
    return chunk, shard


def create(url: str, tmpl: xr.Dataset, tile_size: int, storage_options: dict | None = None) -> None:
    """Write the cube's metadata and coordinates (no data) at `url`, replacing any cube there."""
    chunk, shard = shard_size(tile_size)
    with _quiet():
        tmpl.to_zarr(
            url,
            mode="w",
            compute=False,
            zarr_format=3,
            consolidated=True,
            encoding=encoding(tmpl, chunk, shard),
            storage_options=storage_options,
        )


def write_tile(
    url: str, ds: xr.Dataset, tile: Tile, outer: GeoBox, storage_options: dict | None = None
) -> None:
    """Write one tile's data (dims time, y, x on the tile's GeoBox) into its region of the cube."""
    rows, cols = tile.slices_in(outer)
    payload = ds.drop_vars([c for c in ds.coords], errors="ignore")
    with _quiet():
        payload.to_zarr(
            url,
            region={"time": slice(None), "y": rows, "x": cols},
            mode="r+",
            zarr_format=3,
            storage_options=storage_options,
        )


def open_cube(url: str, storage_options: dict | None = None) -> xr.Dataset:
    """Open a cube lazily without dask: indexing a window reads only the shards it touches."""
    with _quiet():
        return xr.open_zarr(url, consolidated=True, chunks=None, storage_options=storage_options)


def read_tile(cube: xr.Dataset, tile: Tile) -> xr.Dataset:
    """The tile's window of an open cube, loaded into memory as float32.

    (Zarr attributes are JSON, so CF decoding of int16 + scale_factor yields float64.)
    """
    outer = GeoBox.from_bbox(_bounds(cube), crs=tile.grid.crs, resolution=tile.grid.resolution)
    rows, cols = tile.slices_in(outer)
    with _quiet():
        window = cube.isel(y=rows, x=cols).load()
    return window.map(lambda var: var.astype("float32"), keep_attrs=True)


def _bounds(cube: xr.Dataset) -> tuple[float, float, float, float]:
    res = float(abs(cube.x[1] - cube.x[0]))
    return (
        float(cube.x.min()) - res / 2,
        float(cube.y.min()) - res / 2,
        float(cube.x.max()) + res / 2,
        float(cube.y.max()) + res / 2,
    )


class _quiet(warnings.catch_warnings):
    """Numcodecs codecs in Zarr v3 warn on every use; zarr-python reads them everywhere."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        warnings.filterwarnings("ignore", message=".*consolidated metadata.*")
        return self
