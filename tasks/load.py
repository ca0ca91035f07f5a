"""Read one date of items onto windows of the grid: S2 scaled and SCL-masked, S1 in dB.

The unit of work is a `DateRead`: the items of one solar day and one or more destination windows
(blocks of tiles), so each COG of the date is opened once. Reads are windowed, never a whole
granule: where the window is the source grid refined by an integer factor (20 m SCL/bands onto
the 10 m grid of the same CRS) it is a plain windowed read; otherwise odc-loader's rasterio reader
reprojects (overviews and warping as odc-stac does). S2 reads SCL first and skips the bands of an
item whose window is all masked. A failure to read an item (a missing or corrupt COG) drops that
item only and is returned with its reason, so the run summary can name it; odc-stac's
`fail_on_error=False` would lose which item failed.

GDAL/AWS settings travel as an explicit, secret-free dict (`tasks.storage.gdal_env()`) that each
task enters, never as worker globals; credentials come from each worker's own environment.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, overload
from urllib.parse import urlsplit

import numpy as np
import pystac
import xarray as xr
from odc.geo import CRS
from odc.geo.geobox import GeoBox

from pivotmap.tasks.sensors import (
    S1_VARIABLES,
    S2_VARIABLES,
    Harmonisation,
    s1_asset_map,
    s2_asset_map,
    s2_scale_offset,
)
from pivotmap.tasks.storage import gdal_env

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

SCL = "SCL"
# GDAL retries 5xx answers and reset connections per request, not a short body: the whole
# open + read of a remote COG is tried this often, with exponential backoff between tries.
REMOTE_READ_ATTEMPTS = 4
REMOTE_READ_BACKOFF_S = 0.25


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class AssetRead:
    """One asset of one item: where it is and how DN become values."""

    variable: str
    href: str
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True)
class ItemRead:
    """The assets of one item needed for the cube."""

    item_id: str
    assets: tuple[AssetRead, ...]


@dataclass(frozen=True)
class DateRead:
    """All items of one date onto one or more windows: the small, frozen unit sent to Dask.

    Several windows (tile blocks) share one task so that each COG of the date is opened once.
    """

    modality: str
    geoboxes: tuple[GeoBox, ...]
    items: tuple[ItemRead, ...]
    scl_mask: tuple[int, ...] = ()
    dilation_px: int = 0

    def __dask_tokenize__(self) -> tuple:
        boxes = tuple((str(g.crs), tuple(g.transform)[:6], g.shape.yx) for g in self.geoboxes)
        return (DateRead, self.modality, boxes, self.items, self.scl_mask, self.dilation_px)


@dataclass(frozen=True)
class DateResult:
    """Per window, one date's values per variable (float32, NaN = invalid); failed items."""

    values: tuple[dict[str, np.ndarray], ...]
    failures: tuple[tuple[str, str], ...] = ()
    items_read: int = 0


def item_reads(
    items: list[pystac.Item], modality: str, harmonisation: Harmonisation = "metadata"
) -> dict[str, ItemRead]:
    """What to read of each item (asset hrefs, scale and offset), keyed by item id."""
    return {it.id: _item_read(it, modality, harmonisation) for it in items}


def _item_read(item: pystac.Item, modality: str, harmonisation: Harmonisation) -> ItemRead:
    if modality == "s2":
        amap = s2_asset_map(item)
        assert amap.mask is not None  # s2_asset_map raises for an item without SCL
        assets = [AssetRead(SCL, _href(item, amap.mask))]
        for var, key in amap.variables.items():
            scale, offset = s2_scale_offset(item, key, harmonisation)
            assets.append(AssetRead(var, _href(item, key), scale, offset))
    else:
        amap = s1_asset_map(item)
        assets = [AssetRead(var, _href(item, key)) for var, key in amap.variables.items()]
    return ItemRead(item.id, tuple(assets))


def _href(item: pystac.Item, key: str) -> str:
    return item.assets[key].get_absolute_href() or item.assets[key].href


def solar_day(item: pystac.Item) -> np.datetime64:
    """Local solar date of an acquisition (what odc-stac's `groupby="solar_day"` uses)."""
    lon = 0.0
    if item.bbox:
        lon = (item.bbox[0] + item.bbox[2]) / 2
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise ValueError(
            f"item {item.id} has neither `datetime` nor `start_datetime`: it cannot be dated"
        )
    when = when.astimezone(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=lon / 15)
    return np.datetime64(when.date(), "ns")


def by_day(items: list[pystac.Item]) -> dict[np.datetime64, list[pystac.Item]]:
    """Items grouped by solar day, days in order, items in (datetime, id) order within a day."""
    groups: dict[np.datetime64, list[pystac.Item]] = defaultdict(list)
    for item in items:
        groups[solar_day(item)].append(item)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------- reading


def read_date(task: DateRead, env: dict[str, str]) -> DateResult:
    """Read and mosaic one date (first valid item wins per pixel) inside the given GDAL env."""
    import rasterio

    _bound_block_cache()
    with rasterio.Env(**env):
        return _read_s2(task) if task.modality == "s2" else _read_s1(task)


BLOCK_CACHE_BYTES = 16 << 20


@cache
def _bound_block_cache() -> None:
    """GDAL's decoded-block cache, shared by the process, at 16 MB instead of 5 % of RAM
    (GDAL's default, which files kept open by `OPEN_COGS` would fill); an operator's
    GDAL_CACHEMAX in the environment wins. Set once, outside any rasterio.Env (whose exit
    would restore the setting it found while another thread reads)."""
    import os

    from rasterio.env import set_gdal_config

    if "GDAL_CACHEMAX" not in os.environ:
        set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)


def _empty(task: DateRead, variables: tuple[str, ...]) -> tuple[list[dict], list[np.ndarray]]:
    shapes = [g.shape.yx for g in task.geoboxes]
    out = [{v: np.full(s, np.nan, dtype="float32") for v in variables} for s in shapes]
    return out, [np.zeros(s, dtype=bool) for s in shapes]


def _read_s2(task: DateRead) -> DateResult:
    out, filled = _empty(task, S2_VARIABLES)
    failures, read = [], 0
    for item in task.items:
        try:
            valid = [v & ~f for v, f in zip(_scl_valid(item, task), filled, strict=True)]
            wanted = [bool(v.any()) for v in valid]
            if not any(wanted):
                continue  # all masked here: the bands are not read at all
            bands = {a.variable: _read_values(a, task.geoboxes, wanted) for a in item.assets[1:]}
            read += 1
        except Exception as exc:  # one bad COG skips its item, not the run
            failures.append((item.item_id, _read_error(exc)))
            continue
        for k in (k for k, w in enumerate(wanted) if w):
            for band in bands.values():
                valid[k] &= np.isfinite(_wanted(band[k]))
            for var, band in bands.items():
                out[k][var][valid[k]] = _wanted(band[k])[valid[k]]
            filled[k] |= valid[k]
    return DateResult(tuple(out), tuple(failures), read)


def _wanted(values: np.ndarray | None) -> np.ndarray:
    """A window's values read because it was wanted (`_read_values` gives None only if not)."""
    assert values is not None
    return values


def _scl_valid(item: ItemRead, task: DateRead) -> list[np.ndarray]:
    scl = _read_raw(item.assets[0].href, task.geoboxes, "nearest", "uint8", 0)
    masks = [np.isin(s, (0, *task.scl_mask)) for s in scl]
    if task.dilation_px:
        masks = [dilate(m, task.dilation_px) for m in masks]
    return [~m for m in masks]


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a boolean mask by `pixels` (a disc), e.g. to catch cloud edges SCL misses."""
    from scipy.ndimage import binary_dilation

    r = np.arange(-pixels, pixels + 1)
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= pixels**2
    return binary_dilation(mask, structure=disc)


def _read_s1(task: DateRead) -> DateResult:
    out, filled = _empty(task, S1_VARIABLES)
    failures, read = [], 0
    for item in task.items:
        try:
            linear = {a.variable: _read_raw(a.href, task.geoboxes, "bilinear", "float32", np.nan)
                      for a in item.assets}  # fmt: skip
            read += 1
        except Exception as exc:
            failures.append((item.item_id, _read_error(exc)))
            continue
        for k in range(len(task.geoboxes)):
            valid = ~filled[k]
            for band in linear.values():
                valid &= np.isfinite(band[k]) & (band[k] > 0)
            for var, band in linear.items():
                out[k][var][valid] = 10.0 * np.log10(band[k][valid])
            filled[k] |= valid
    return DateResult(tuple(out), tuple(failures), read)


def _read_values(asset: AssetRead, geoboxes, wanted: list[bool]) -> list[np.ndarray | None]:
    """DN → float32 value (scale, offset); DN 0 (no data) → NaN; None where not wanted."""
    out = []
    for dn in _read_raw(asset.href, geoboxes, "bilinear", "float32", np.nan, wanted):
        if dn is not None:
            dn[dn == 0] = np.nan
            dn = (dn * np.float32(asset.scale) + np.float32(asset.offset)).astype("float32")
        out.append(dn)
    return out


@overload
def _read_raw(
    href: str,
    geoboxes: tuple[GeoBox, ...],
    resampling: str,
    dtype: str,
    fill,
    wanted: None = None,
) -> list[np.ndarray]: ...


@overload
def _read_raw(
    href: str,
    geoboxes: tuple[GeoBox, ...],
    resampling: str,
    dtype: str,
    fill,
    wanted: list[bool],
) -> list[np.ndarray | None]: ...


def _read_raw(
    href: str,
    geoboxes: tuple[GeoBox, ...],
    resampling: str,
    dtype: str,
    fill,
    wanted: list[bool] | None = None,
) -> list[np.ndarray] | list[np.ndarray | None]:
    """`_read_once`, tried again for a remote COG (GDAL itself retries 5xx answers and resets,
    not a body cut short, which fails the read; its caches would replay that failure, so a
    retry reads the file uncached)."""
    import rasterio

    args = (href, geoboxes, resampling, dtype, fill, wanted)
    remote = _vsi_path(href)
    for attempt in range(REMOTE_READ_ATTEMPTS if remote else 1):
        if attempt:
            time.sleep(REMOTE_READ_BACKOFF_S * 2 ** (attempt - 1))
        try:
            with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=remote) if attempt else nullcontext():
                return _read_once(*args, keep=not attempt)
        except CogReadError:
            raise  # the file itself is wrong (no CRS, misplaced): reading again cannot help
        except Exception as exc:
            error = exc
    raise CogReadError(_describe(href, error)) from error


class CogReadError(RuntimeError):
    """A COG that cannot be read (after retries where remote), named with GDAL's reason."""


def _describe(href: str, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:  # rasterio's "see previous exception"
        text += f" ({' '.join(str(cause).split())})"
    return text if href in text else f"{href}: {type(exc).__name__}: {text}"


def _vsi_path(href: str) -> str | None:
    """GDAL's path of a remote href (what its caches are keyed by); None for a local file."""
    parts = urlsplit(href)
    if parts.scheme in ("http", "https"):
        return f"/vsicurl/{href}"
    if parts.scheme in ("s3", "gs"):
        return f"/vsi{parts.scheme}/{parts.netloc}{parts.path}"
    return href if href.startswith(("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/")) else None


def _read_once(
    href: str,
    geoboxes: tuple[GeoBox, ...],
    resampling: str,
    dtype: str,
    fill,
    wanted: list[bool] | None = None,
    keep: bool = True,
) -> list[np.ndarray | None]:
    """The asset's pixels on each geobox (opened once, or kept open by `OPEN_COGS`): a direct
    windowed read where the grids align, else odc-loader's warped read."""
    out: list[np.ndarray | None] = []
    with OPEN_COGS.open(href, keep) as cog:
        _check_georeferencing(href, cog, geoboxes)
        for k, geobox in enumerate(geoboxes):
            if wanted is not None and not wanted[k]:
                out.append(None)
                continue
            dst = np.full(geobox.shape.yx, fill, dtype=dtype)
            plan = aligned_window(cog.src.crs, cog.src.transform, cog.src.shape, geobox)
            if plan is not None:
                _read_window(cog.src, plan, resampling, dst, fill)
            else:
                _warped_read(href, geobox, resampling, dst, fill)
            out.append(dst)
    return out


@dataclass
class OpenCog:
    """An open COG with what its georeferencing check needs, worked out once per open."""

    src: DatasetReader
    crs: CRS | None
    bounds: tuple[float, float, float, float]

    @classmethod
    def open(cls, href: str) -> OpenCog:
        import rasterio

        src = rasterio.open(href, sharing=False)
        return cls(src, CRS(src.crs) if src.crs is not None else None, tuple(src.bounds))

    def covers(self, geobox: GeoBox) -> bool:
        """Whether the COG's footprint touches `geobox` (plain bounds in one CRS)."""
        from odc.geo.geom import box

        if self.crs is None:
            return False
        left, bottom, right, top = self.bounds
        if geobox.crs == self.crs:
            g = geobox.boundingbox
            return left <= g.right and g.left <= right and bottom <= g.top and g.bottom <= top
        assert geobox.crs is not None  # a window of the tile grid: always georeferenced
        footprint = box(left, bottom, right, top, self.crs)
        return footprint.to_crs(geobox.crs).intersects(geobox.extent)


class OpenCogs:
    """COGs kept open across reads until `close_all`. A read takes its file out while it reads
    (a GDAL dataset is not safe for two threads at once) and puts it back after.

    Ingest reads a batch of blocks date by date, opening each date's COGs once for all the
    batch's blocks. Batches small enough to bound a worker's memory (`ingest.batch_mb`) mean
    the next batch opens the same files again: on the 1 M px benchmark region, the opens (with
    rasterio's environment set-up per open) and georeferencing checks took as long as the
    reads. At most `limit` files stay open; beyond that a file is opened for one read and
    closed: the reads of every batch cycle through the same files in the same order, where
    evicting the least recently used one would miss every time.
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._files: dict[str, OpenCog] = {}

    @contextmanager
    def open(self, href: str, keep: bool = True) -> Iterator[OpenCog]:
        with self._lock:
            cog = self._files.pop(href, None)
        if cog is None:
            cog = OpenCog.open(href)
        try:
            yield cog
        except BaseException:
            cog.src.close()  # a failed read: the next one opens the file afresh
            raise
        with self._lock:
            if keep and href not in self._files and len(self._files) < self.limit:
                self._files[href] = cog
                return
        cog.src.close()

    def close_all(self) -> int:
        """Close every kept file (an ingest's end: hrefs may be rewritten before the next)."""
        with self._lock:
            files, self._files = self._files, {}
        for cog in files.values():
            cog.src.close()
        return len(files)


def _open_file_limit() -> int:
    """A quarter of this process's open-file limit, at most 1024 files."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1024 if soft == resource.RLIM_INFINITY else max(0, min(1024, soft // 4))


OPEN_COGS = OpenCogs(_open_file_limit())


def close_cogs() -> int:
    """`OPEN_COGS.close_all()` as a plain function (run on every Dask worker after an ingest)."""
    return OPEN_COGS.close_all()


def _check_georeferencing(href: str, cog: OpenCog, geoboxes: tuple[GeoBox, ...]) -> None:
    """A COG without a CRS, or lying wholly outside the windows its item covers (a wrong CRS or
    transform), is an error naming it, not a silently empty date."""
    if cog.crs is None:
        raise CogReadError(f"{href} has no CRS")
    if not any(cog.covers(g) for g in geoboxes):
        raise CogReadError(
            f"{href} ({cog.src.crs}) lies outside the tiles its item covers: wrong CRS or transform"
        )


def _warped_read(href: str, geobox: GeoBox, resampling: str, dst: np.ndarray, fill) -> None:
    from odc.loader import RasterLoadParams, RasterSource, RioReader
    from odc.loader._rio import LocalContext

    cfg = RasterLoadParams(dtype=str(dst.dtype), fill_value=fill, resampling=resampling)
    RioReader(RasterSource(href), LocalContext()).read(cfg, geobox, dst=dst)


@dataclass(frozen=True)
class WindowPlan:
    """Source window (row, col slices) and where it lands in the destination (k× finer)."""

    src: tuple[slice, slice]
    dst: tuple[slice, slice]
    factor: int = 1


def aligned_window(crs, transform, shape: tuple[int, int], geobox: GeoBox) -> WindowPlan | None:
    """A plain read plan when `geobox` is the source grid refined by an integer factor, else None.

    Then no warp is needed: the window is read (and upsampled by GDAL's resampled RasterIO),
    which is several times faster than a general reprojection; partial overlap is clipped.
    """
    from odc.geo import CRS

    gt, st = geobox.transform, transform
    if crs is None or st.b or st.d or gt.b or gt.d or CRS(crs) != geobox.crs:
        return None
    k = st.a / gt.a
    if round(k) < 1 or abs(k - round(k)) > 1e-6 or abs(st.e / gt.e - k) > 1e-6:
        return None
    k = round(k)
    col0, row0 = (gt.c - st.c) / st.a, (gt.f - st.f) / st.e
    ny, nx = geobox.shape.yx
    if abs(col0 - round(col0)) > 1e-6 or abs(row0 - round(row0)) > 1e-6 or ny % k or nx % k:
        return None
    col0, row0 = round(col0), round(row0)
    r0, r1 = max(row0, 0), min(row0 + ny // k, shape[0])
    c0, c1 = max(col0, 0), min(col0 + nx // k, shape[1])
    if r1 <= r0 or c1 <= c0:
        return WindowPlan((slice(0, 0), slice(0, 0)), (slice(0, 0), slice(0, 0)))
    dst = (slice((r0 - row0) * k, (r1 - row0) * k), slice((c0 - col0) * k, (c1 - col0) * k))
    return WindowPlan((slice(r0, r1), slice(c0, c1)), dst, k)


def _read_window(src, plan: WindowPlan, resampling: str, dst: np.ndarray, fill) -> None:
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    (r, c), (dr, dc) = plan.src, plan.dst
    if r.stop <= r.start:
        return
    out = dst[dr, dc]
    window = Window(c.start, r.start, c.stop - c.start, r.stop - r.start)
    src.read(1, window=window, out=out, resampling=Resampling[resampling])
    nodata = src.nodata
    if nodata is None or np.isnan(nodata):
        return
    out[out == nodata] = fill
    if plan.factor > 1 and resampling != "nearest":
        # interpolation next to a no-data source pixel mixes in its value: drop that fringe
        bad = src.read(1, window=window) == nodata
        if bad.any():
            bad = dilate(bad, 1).repeat(plan.factor, 0).repeat(plan.factor, 1)
            out[bad] = fill


def _read_error(exc: Exception) -> str:
    """The reason a run report gives; URL queries (signed hrefs carry tokens) are cut."""
    text = _URL_QUERY.sub(r"\1?…", " ".join(str(exc).split()))[:300]
    return f"cannot read COG: {type(exc).__name__}: {text}"


_URL_QUERY = re.compile(r"((?:https?|s3|gs|az)://[^\s?]*)\?[^\s'\")]*")


# ---------------------------------------------------------------------------- convenience


def load_dates(
    items: list[pystac.Item],
    geobox: GeoBox,
    modality: str,
    *,
    scl_mask: tuple[int, ...] = (),
    dilation_px: int = 0,
    harmonisation: Harmonisation = "metadata",
    env: dict[str, str] | None = None,
    workers: int = 4,
) -> xr.Dataset:
    """All dates of `items` on `geobox` as a Dataset (time, y, x); failures in attrs."""
    import dask

    plans = item_reads(items, modality, harmonisation)
    days = by_day(items)
    tasks = [
        DateRead(modality, (geobox,), tuple(plans[i.id] for i in group), scl_mask, dilation_px)
        for group in days.values()
    ]
    env = gdal_env() if env is None else env
    lazy = [dask.delayed(read_date, pure=True)(t, env) for t in tasks]
    results = dask.compute(*lazy, scheduler="threads", num_workers=workers)
    ds = to_dataset(list(results), np.array(list(days), dtype="datetime64[ns]"), geobox)
    ds.attrs["n_items"] = len(items)
    ds.attrs["failed_items"] = [list(f) for r in results for f in r.failures]
    return ds


def to_dataset(
    results: list[DateResult], times: np.ndarray, geobox: GeoBox, window: int = 0
) -> xr.Dataset:
    """Stack per-date results of one window into (time, y, x) float32 variables with coords."""
    from odc.geo.xr import xr_coords

    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    coords["time"] = xr.DataArray(times, dims="time")
    names = list(results[0].values[window]) if results else []
    data = {
        v: (("time", "y", "x"), np.stack([r.values[window][v] for r in results])) for v in names
    }
    return xr.Dataset(data, coords=coords)


def load_s2(
    items: list[pystac.Item],
    geobox: GeoBox,
    scl_mask: tuple[int, ...],
    dilation_px: int = 0,
    harmonisation: Harmonisation = "metadata",
) -> xr.Dataset:
    """Reflectance of the 10 S2 bands, NaN where SCL is in `scl_mask` (or 0) or a band is nodata.

    Scale and offset come from each item's `raster:bands` (or its processing baseline), so
    reflectances from before and after processing baseline 04.00 (offset -0.1) are comparable.
    """
    return load_dates(
        items,
        geobox,
        "s2",
        scl_mask=scl_mask,
        dilation_px=dilation_px,
        harmonisation=harmonisation,
    )


def load_s1(items: list[pystac.Item], geobox: GeoBox) -> xr.Dataset:
    """VV and VH backscatter in dB (10·log10 of linear power; non-positive power is NaN)."""
    return load_dates(items, geobox, "s1")
