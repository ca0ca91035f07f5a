"""Asset keys of the Sentinel collections as real catalogues serve them, mapped to cube variables."""

from __future__ import annotations

from dataclasses import dataclass

import pystac

S2_VARIABLES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_VARIABLES = ("VV", "VH")

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


class AssetError(KeyError):
    """An item lacks an asset the cube needs."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class AssetMap:
    """Cube variable -> asset key for one item layout, plus the mask asset."""

    variables: dict[str, str]
    mask: str | None


def s2_asset_map(item: pystac.Item) -> AssetMap:
    """The S2 L2A layout of `item` (Earth Search v1 or band-id style); errors name the item."""
    for layout, scl in ((_S2_EARTH_SEARCH, "scl"), (_S2_BAND_IDS, "SCL")):
        if all(key in item.assets for key in layout.values()):
            if scl not in item.assets:
                raise AssetError(
                    f"item {item.id} has no SCL asset ({scl!r}): it cannot be cloud-masked; "
                    "use a collection that serves SCL"
                )
            return AssetMap(variables=dict(layout), mask=scl)
    missing = [k for k in _S2_EARTH_SEARCH.values() if k not in item.assets]
    raise AssetError(f"item {item.id} lacks S2 band assets {missing} (has {sorted(item.assets)})")


def s1_asset_map(item: pystac.Item) -> AssetMap:
    """The S1 layout (`vv`/`vh` in Earth Search GRD and Planetary Computer RTC)."""
    keys = {k.lower(): k for k in item.assets}
    if "vv" not in keys or "vh" not in keys:
        raise AssetError(f"item {item.id} lacks S1 assets vv/vh (has {sorted(item.assets)})")
    return AssetMap(variables={"VV": keys["vv"], "VH": keys["vh"]}, mask=None)


def scale_offset(item: pystac.Item, asset_key: str) -> tuple[float, float]:
    """`raster:bands` scale and offset of an asset (1, 0 when absent)."""
    bands = item.assets[asset_key].extra_fields.get("raster:bands") or [{}]
    return float(bands[0].get("scale", 1.0)), float(bands[0].get("offset", 0.0))


def orbit_state(item: pystac.Item) -> str | None:
    state = item.properties.get("sat:orbit_state")
    return state.lower() if isinstance(state, str) else None
