"""Load items onto a tile's GeoBox with odc-stac: S2 scaled and SCL-masked, S1 in dB.

Both return float32 Datasets (time, y, x) with NaN where there is no valid observation; time is
the solar day of the acquisition (midnight), one entry per day with at least one item.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import numpy as np
import pystac
import xarray as xr
from odc.geo.geobox import GeoBox

from pivotmap.tasks.sensors import s1_asset_map, s2_asset_map, scale_offset


def solar_day(item: pystac.Item) -> np.datetime64:
    """Local solar date of an acquisition (what odc-stac's `groupby="solar_day"` uses)."""
    lon = 0.0
    if item.bbox:
        lon = (item.bbox[0] + item.bbox[2]) / 2
    when = item.datetime.astimezone(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=lon / 15)
    return np.datetime64(when.date(), "ns")


def _by_day(items: list[pystac.Item]) -> dict[np.datetime64, list[pystac.Item]]:
    groups: dict[np.datetime64, list[pystac.Item]] = defaultdict(list)
    for item in items:
        groups[solar_day(item)].append(item)
    return dict(sorted(groups.items()))


def _odc_load(items, bands, geobox, resampling) -> xr.Dataset:
    import odc.stac

    ds = odc.stac.load(
        items, bands=bands, geobox=geobox, groupby="solar_day", resampling=resampling, chunks=None
    )
    days = list(_by_day(items))
    if ds.sizes["time"] != len(days):
        raise RuntimeError(f"odc-stac grouped {ds.sizes['time']} days, expected {len(days)}")
    return ds.assign_coords(time=np.array(days, dtype="datetime64[ns]"))


def load_s2(items: list[pystac.Item], geobox: GeoBox, scl_mask: tuple[int, ...]) -> xr.Dataset:
    """Reflectance of the 10 S2 bands, NaN where SCL is in `scl_mask` or a band is nodata.

    Scale and offset come from each item's `raster:bands`, so reflectances from before and after
    processing baseline 04.00 (offset -0.1) are comparable.
    """
    amap = s2_asset_map(items[0])
    bands = [*amap.variables.values(), amap.mask]
    resampling = {amap.mask: "nearest", "*": "bilinear"}
    raw = _odc_load(items, bands, geobox, resampling)
    masked = raw[amap.mask].isin(list(scl_mask)) | (raw[amap.mask] == 0)
    per_day = _by_day(items)
    out = {}
    for var, key in amap.variables.items():
        scale, offset = _per_day_scale_offset(per_day, key)
        dn = raw[key]
        values = dn.astype("float32") * scale[:, None, None] + offset[:, None, None]
        out[var] = values.where((dn != 0) & ~masked).astype("float32")
    ds = xr.Dataset(out, coords={"time": raw.time, "y": raw.y, "x": raw.x})
    ds.attrs["n_items"] = len(items)
    return ds


def _per_day_scale_offset(per_day: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [scale_offset(day_items[0], key) for day_items in per_day.values()]
    scale = np.array([p[0] for p in pairs], dtype="float32")
    offset = np.array([p[1] for p in pairs], dtype="float32")
    return scale, offset


def load_s1(items: list[pystac.Item], geobox: GeoBox) -> xr.Dataset:
    """VV and VH backscatter in dB (10·log10 of linear power; non-positive power is NaN)."""
    amap = s1_asset_map(items[0])
    raw = _odc_load(items, list(amap.variables.values()), geobox, "bilinear")
    out = {}
    for var, key in amap.variables.items():
        linear = raw[key].astype("float32")
        nodata = raw[key].attrs.get("nodata")
        valid = linear > 0
        if nodata is not None:
            valid &= linear != nodata
        with np.errstate(divide="ignore", invalid="ignore"):
            out[var] = (10 * np.log10(linear.where(valid))).astype("float32")
    ds = xr.Dataset(out, coords={"time": raw.time, "y": raw.y, "x": raw.x})
    ds.attrs["n_items"] = len(items)
    return ds
