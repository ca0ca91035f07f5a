"""Whole-region summaries of a run: the quicklook PNG with legend and the class-area table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from odc.geo.geobox import GeoBox

from pivotmap.tasks.cog import mosaic_layout
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


def decimated_mosaic(tiles: Sequence[tuple[np.ndarray, GeoBox]], max_size: int) -> np.ndarray:
    """The class mosaic sampled every `step` pixels so its longer side is at most `max_size`."""
    layout = mosaic_layout([gb for _, gb in tiles])
    step = max(1, math.ceil(max(layout.width, layout.height) / max_size))
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


def write_quicklook(
    path: Path,
    tiles: Sequence[tuple[np.ndarray, GeoBox]],
    nomenclature: Nomenclature,
    title: str,
    *,
    max_size: int = 1600,
) -> Path:
    """Render the whole-region class map with a legend to a PNG (Agg, no pyplot state)."""
    mosaic = decimated_mosaic(tiles, max_size)
    figure = Figure(figsize=(10, 7), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.02, 0.04, 0.68, 0.86))
    axes.imshow(_rgba_lookup(nomenclature)[mosaic], interpolation="nearest")
    axes.set_axis_off()
    figure.suptitle(title, fontsize=13)
    figure.legend(
        handles=_legend_handles(nomenclature, bool((mosaic == NODATA_CODE).any())),
        loc="center left",
        bbox_to_anchor=(0.72, 0.5),
        title=nomenclature.name,
        frameon=False,
        fontsize=9,
    )
    figure.savefig(path, format="png", metadata=_PNG_METADATA, bbox_inches="tight", pad_inches=0.2)
    return path
