"""Asset keys of the Sentinel collections as real catalogues serve them, mapped to cube variables.

Layouts recognised unchanged: Earth Search v1 (`sentinel-2-l2a`, `sentinel-2-c1-l2a`: common-name
keys `blue` … `swir22`, `scl`; `sentinel-1-grd`: `vv`/`vh`), Planetary Computer and CDSE
(`sentinel-2-l2a`: band ids `B02` … `B12`, `SCL`; `sentinel-1-rtc`: `vv`/`vh`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pystac

S2_VARIABLES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_VARIABLES = ("VV", "VH")
S2_REFLECTANCE_SCALE = 1e-4  # QUANTIFICATION_VALUE 10000
S2_BASELINE_OFFSET = -0.1  # BOA_ADD_OFFSET -1000 DN from processing baseline 04.00 on
SCL_NAMES = (
    "no_data", "saturated_or_defective", "dark_area_pixels", "cloud_shadows", "vegetation",
    "not_vegetated", "water", "unclassified", "cloud_medium_probability",
    "cloud_high_probability", "thin_cirrus", "snow",
)  # fmt: skip

# Earth Search v1 uses common names; Planetary Computer and CDSE use band ids.
_S2_EARTH_SEARCH = dict(
    zip(
        S2_VARIABLES,
        (
            "blue",
            "green",
            "red",
            "rededge1",
            "rededge2",
            "rededge3",
            "nir",
            "nir08",
            "swir16",
            "swir22",
        ),
        strict=True,
    )
)
_S2_BAND_IDS = {band: band for band in S2_VARIABLES}
Harmonisation = Literal["metadata", "baseline"]


class AssetError(KeyError):
    """An item lacks an asset the cube needs."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class AssetMap:
    """Cube variable -> asset key for one item layout, plus the mask asset (None: none found)."""

    variables: dict[str, str]
    mask: str | None


def s2_layout(item: pystac.Item) -> AssetMap:
    """The S2 L2A layout of `item`: the band keys it has most of, and its SCL key if any."""
    scored = [
        (sum(k in item.assets for k in layout.values()), layout, scl)
        for layout, scl in ((_S2_EARTH_SEARCH, "scl"), (_S2_BAND_IDS, "SCL"))
    ]
    _, layout, scl = max(scored, key=lambda s: s[0])
    return AssetMap(variables=dict(layout), mask=scl if scl in item.assets else None)


def s2_asset_map(item: pystac.Item) -> AssetMap:
    """The S2 L2A layout of `item` (Earth Search v1 or band-id style); errors name the item."""
    amap = s2_layout(item)
    missing = [k for k in amap.variables.values() if k not in item.assets]
    if missing:
        raise AssetError(
            f"item {item.id} lacks S2 band assets {missing} (has {sorted(item.assets)})"
        )
    if amap.mask is None:
        raise AssetError(
            f"item {item.id} has no SCL asset: it cannot be cloud-masked; use a collection that "
            "serves SCL or set `ingest.s2_without_scl: skip`"
        )
    return amap


def s1_asset_map(item: pystac.Item) -> AssetMap:
    """The S1 layout (`vv`/`vh` in Earth Search GRD and Planetary Computer RTC)."""
    keys = {k.lower(): k for k in item.assets}
    if "vv" not in keys or "vh" not in keys:
        pols = item.properties.get("sar:polarizations")
        raise AssetError(
            f"item {item.id} lacks S1 assets vv/vh (has {sorted(item.assets)}, polarisations "
            f"{pols}); pivotmap needs VV+VH (IW dual-pol)"
        )
    return AssetMap(variables={"VV": keys["vv"], "VH": keys["vh"]}, mask=None)


def processing_baseline(item: pystac.Item) -> float | None:
    """`s2:processing_baseline` (or the older `sentinel:processing_baseline`) as a number."""
    for key in ("s2:processing_baseline", "sentinel:processing_baseline", "processing:version"):
        value = item.properties.get(key)
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            continue
    return None


def raster_band(item: pystac.Item, asset_key: str) -> dict:
    """The first `raster:bands` entry of an asset ({} when absent)."""
    bands = item.assets[asset_key].extra_fields.get("raster:bands") or [{}]
    return bands[0] if isinstance(bands[0], dict) else {}


def scale_offset(item: pystac.Item, asset_key: str) -> tuple[float, float]:
    """`raster:bands` scale and offset of an asset (1, 0 when absent)."""
    band = raster_band(item, asset_key)
    return float(band.get("scale", 1.0)), float(band.get("offset", 0.0))


def s2_scale_offset(
    item: pystac.Item, asset_key: str, policy: Harmonisation = "metadata"
) -> tuple[float, float]:
    """Reflectance = DN * scale + offset, comparable across processing baselines.

    `metadata`: the asset's `raster:bands` scale/offset where declared (Earth Search v1), else the
    processing baseline decides (Planetary Computer declares none): offset -0.1 from 04.00 on.
    `baseline`: ignore `raster:bands` and use the baseline rule (for catalogues whose declared
    offsets are known to be wrong).
    """
    band = raster_band(item, asset_key)
    if policy == "metadata" and "offset" in band:
        return float(band.get("scale", S2_REFLECTANCE_SCALE)), float(band["offset"])
    baseline = processing_baseline(item)
    offset = S2_BASELINE_OFFSET if baseline is not None and baseline >= 4.0 else 0.0
    return float(band.get("scale", S2_REFLECTANCE_SCALE)), offset


def orbit_state(item: pystac.Item) -> str | None:
    """`sat:orbit_state` lower-cased ('ascending'/'descending'), None when not given."""
    state = item.properties.get("sat:orbit_state")
    return state.lower() if isinstance(state, str) else None


def item_epsg(item: pystac.Item, asset_key: str | None = None) -> int | None:
    """EPSG code of the item's (or the asset's) pixels from `proj:epsg` / `proj:code`."""
    for fields in (item.assets[asset_key].extra_fields if asset_key else {}, item.properties):
        if fields.get("proj:epsg") is not None:
            return int(fields["proj:epsg"])
        code = fields.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":", 1)[1])
    return None
