"""Whole-region summaries of a run: the quicklook map and the class-area table.

The quicklook is a small map a person can read without a GIS: legend, grid coordinates in the
map's CRS, a scale bar, and a subtitle with the period, the product version and the CRS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from odc.geo.geobox import GeoBox

from pivotmap.tasks.cog import MosaicLayout, mosaic_layout
from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature

# Matplotlib stamps its name and version into PNGs by default; None removes the key so that
# two runs of the same input give the same bytes.
_PNG_METADATA: dict[str, str | None] = {"Software": None}
_NODATA_RGBA = (0.85, 0.85, 0.85, 1.0)


def class_counts(classes: np.ndarray) -> np.ndarray:
    """Pixel count per uint8 code (length 256)."""
    return np.bincount(classes.ravel(), minlength=256)


def class_areas(
    tiles: Sequence[tuple[np.ndarray, GeoBox]], nomenclature: Nomenclature
) -> dict[str, Any]:
    """Pixel count and area (km², in the grid CRS) per class over all tiles."""
    counts = np.zeros(256, dtype=np.int64)
    km2_per_pixel = 0.0
    for classes, geobox in tiles:
        counts += class_counts(classes)
        # Tiles share one grid (checked by the mosaic), so one pixel area serves for all.
        km2_per_pixel = abs(geobox.affine.a * geobox.affine.e) / 1e6
    rows: list[dict[str, Any]] = [
        {
            "code": cls.code,
            "name": cls.name,
            "pixels": int(counts[cls.code]),
            "area_km2": round(int(counts[cls.code]) * km2_per_pixel, 6),
        }
        for cls in nomenclature.classes
    ]
    return {
        "nomenclature": nomenclature.name,
        "area_note": "planimetric area in the grid CRS (pixel count x pixel area)",
        "pixel_area_km2": km2_per_pixel,
        "classes": rows,
        "nodata_pixels": int(counts[NODATA_CODE]),
        "mapped_km2": round(sum(r["pixels"] for r in rows) * km2_per_pixel, 6),
    }


def decimation_step(layout: MosaicLayout, max_size: int) -> int:
    """Keep every `step`-th pixel so that the longer side is at most `max_size`."""
    return max(1, math.ceil(max(layout.width, layout.height) / max_size))


def decimated_mosaic(tiles: Sequence[tuple[np.ndarray, GeoBox]], max_size: int) -> np.ndarray:
    """The class mosaic sampled every `step` pixels so its longer side is at most `max_size`."""
    layout = mosaic_layout([gb for _, gb in tiles])
    step = decimation_step(layout, max_size)
    out = np.full(
        (math.ceil(layout.height / step), math.ceil(layout.width / step)), NODATA_CODE, np.uint8
    )
    for (classes, _), (row, col) in zip(tiles, layout.offsets, strict=True):
        # Keep the global sampling lattice (multiples of `step`) so tile seams stay invisible.
        r0, c0 = (-row) % step, (-col) % step
        part = classes[r0::step, c0::step]
        top, left = (row + r0) // step, (col + c0) // step
        out[top : top + part.shape[0], left : left + part.shape[1]] = part
    return out


def _rgba_lookup(nomenclature: Nomenclature) -> np.ndarray:
    """256 x 4 float lookup table from class code to display colour."""
    lut = np.zeros((256, 4))
    lut[:] = _NODATA_RGBA
    for cls in nomenclature.classes:
        lut[cls.code] = (*(v / 255 for v in cls.rgb), 1.0)
    return lut


def _legend_handles(nomenclature: Nomenclature, has_nodata: bool) -> list[Patch]:
    """One patch per class (code and name), plus 'no data' when the map has gaps."""
    handles = [
        Patch(facecolor=c.color, edgecolor="black", linewidth=0.5, label=f"{c.code} {c.name}")
        for c in nomenclature.classes
    ]
    if has_nodata:
        handles.append(
            Patch(facecolor=_NODATA_RGBA, edgecolor="black", linewidth=0.5, label="no data")
        )
    return handles


def nice_length(span: float) -> float:
    """A 1, 2 or 5 x 10^n length of at most a fifth of `span` (> 0): a readable scale bar."""
    target = span / 5
    power = 10 ** math.floor(math.log10(target))
    return max(f * power for f in (1, 2, 5) if f * power <= target)


def _length_label(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def crs_label(geobox: GeoBox) -> str:
    """'EPSG:32631 (WGS 84 / UTM zone 31N)', or the CRS name where there is no EPSG code."""
    crs = geobox.crs
    if crs is None:
        raise ValueError("grid has no CRS: a quicklook needs a georeferenced grid")
    return f"EPSG:{crs.epsg} ({crs.proj.name})" if crs.epsg is not None else str(crs.proj.name)


def _centre_latitude(geobox: GeoBox) -> float:
    return float(geobox.extent.centroid.coords[0][1])


def _add_coordinates(axes: Any, geobox: GeoBox) -> None:
    """Grid lines and tick labels in the map CRS, written out in full (no offset, no 1e6)."""
    geographic = geobox.crs is not None and geobox.crs.geographic
    if geographic:  # a degree of longitude is shorter than one of latitude, by cos(latitude)
        axes.set_aspect(1 / math.cos(math.radians(_centre_latitude(geobox))))
    axes.set_xlabel("longitude (°)" if geographic else "easting (m)", fontsize=8)
    axes.set_ylabel("latitude (°)" if geographic else "northing (m)", fontsize=8)
    for axis in (axes.xaxis, axes.yaxis):
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)
        axis.set_major_locator(MaxNLocator(nbins=5))
    axes.tick_params(labelsize=7)
    axes.grid(color="black", alpha=0.25, linewidth=0.5)


def _add_scale_bar(axes: Any, geobox: GeoBox, width: float) -> str:
    """A scale bar about a fifth of the map width; returns its label."""
    crs = geobox.crs
    if crs is not None and crs.geographic:  # degrees: metres per degree of longitude here
        unit_m = 111_320 * math.cos(math.radians(_centre_latitude(geobox)))
    else:
        unit_m = crs.proj.axis_info[0].unit_conversion_factor if crs is not None else 1.0
    metres = nice_length(width * unit_m)
    label = _length_label(metres)
    bar = AnchoredSizeBar(
        axes.transData, metres / unit_m, label, "lower left", pad=0.6, sep=4,
        frameon=True, size_vertical=0, fontproperties={"size": 8},
    )  # fmt: skip
    bar.patch.set_alpha(0.8)
    axes.add_artist(bar)
    return label


def _map_extent(
    layout: MosaicLayout, shape: tuple[int, int], step: int
) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) of the decimated mosaic in CRS units, for `imshow`."""
    t = layout.transform
    return (t.c, t.c + shape[1] * step * t.a, t.f + shape[0] * step * t.e, t.f)


def subtitle(geobox: GeoBox, period: str = "", version: str = "") -> str:
    """'period 2023-01-01 – 2023-12-31 · version v3 · CRS EPSG:…', leaving out unknown parts."""
    parts = [f"period {period}" if period else "", f"version {version}" if version else ""]
    return " · ".join([p for p in parts if p] + [f"CRS {crs_label(geobox)}"])


def render_quicklook(
    tiles: Sequence[tuple[np.ndarray, GeoBox]],
    nomenclature: Nomenclature,
    title: str,
    *,
    period: str = "",
    version: str = "",
    max_size: int = 1600,
) -> Figure:
    """The quicklook as a Matplotlib figure (Agg canvas, no pyplot state): map, grid, legend."""
    mosaic = decimated_mosaic(tiles, max_size)
    layout = mosaic_layout([gb for _, gb in tiles])
    geobox = tiles[0][1]
    figure = Figure(figsize=(10, 7), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.08, 0.08, 0.62, 0.80))
    extent = _map_extent(layout, mosaic.shape, decimation_step(layout, max_size))
    axes.imshow(_rgba_lookup(nomenclature)[mosaic], interpolation="nearest", extent=extent)
    _add_coordinates(axes, geobox)
    _add_scale_bar(axes, geobox, extent[1] - extent[0])
    # Titles hang off the map's top edge, so they stay over the map whatever its aspect.
    axes.set_title(subtitle(geobox, period, version), fontsize=9, pad=6)
    axes.annotate(
        title, (0.5, 1.0), xytext=(0, 22), xycoords="axes fraction", textcoords="offset points",
        ha="center", va="bottom", fontsize=13,
    )  # fmt: skip
    figure.legend(
        handles=_legend_handles(nomenclature, bool((mosaic == NODATA_CODE).any())),
        loc="center left",
        bbox_to_anchor=(0.72, 0.5),
        title=nomenclature.name,
        frameon=False,
        fontsize=9,
    )
    return figure


def write_quicklook(
    path: Path,
    tiles: Sequence[tuple[np.ndarray, GeoBox]],
    nomenclature: Nomenclature,
    title: str,
    *,
    period: str = "",
    version: str = "",
    max_size: int = 1600,
) -> Path:
    """Render the whole-region class map (legend, grid, scale bar, period, version) to a PNG."""
    figure = render_quicklook(
        tiles, nomenclature, title, period=period, version=version, max_size=max_size
    )
    figure.savefig(path, format="png", metadata=_PNG_METADATA, bbox_inches="tight", pad_inches=0.2)
    return path
