"""Cloud-optimised GeoTIFFs and a VRT mosaic of map tiles, byte-identical for identical input.

Class names reach GDAL readers three ways: the VRT band holds `CategoryNames` and a raster
attribute table; each class COG carries a band description and `CLASS_<code>` band metadata in
its GDAL_METADATA tag; and a `<cog>.aux.xml` sidecar beside it holds the category names and the
attribute table, because GDAL before 3.12 keeps those for GeoTIFF only in such a PAM file
(OSGeo/gdal#13201 moved the RAT into the TIFF tag in 3.12; rasterio 1.4.4 bundles GDAL 3.10).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox

from pivotmap.tasks.nomenclature import NODATA_CODE

Colormap = Mapping[int, tuple[int, int, int, int]]
ClassNames = Mapping[int, str]  # class code -> name, from the nomenclature

CLASS_BAND = "land-cover class"
CONFIDENCE_BAND, CONFIDENCE_UNIT = "classifier confidence", "%"
# Attribute table columns: name, GDALRATFieldType (0 integer, 2 string) and GDALRATFieldUsage
# (5 MinMax = the pixel value, 2 Name, 6..9 Red/Green/Blue/Alpha), as gdal.h numbers them.
_RAT_COLUMNS = (
    ("value", 0, 5), ("class_name", 2, 2),
    ("red", 0, 6), ("green", 0, 7), ("blue", 0, 8), ("alpha", 0, 9),
)  # fmt: skip

# The COG driver writes no timestamps; PAM off stops GDAL leaving .aux.xml sidecars next to
# the files (they would break byte-identical reruns and the idempotency check).
_GDAL_ENV = {"GDAL_PAM_ENABLED": "NO", "GDAL_NUM_THREADS": "1"}
_COG_OPTIONS = {"compress": "DEFLATE", "blocksize": 512, "bigtiff": "IF_SAFER"}


class MosaicError(ValueError):
    """Tiles cannot be assembled into one mosaic (different CRS, resolution or pixel grid)."""


def _rasterio_crs(geobox: GeoBox) -> str:
    """EPSG code where there is one: short, standard GeoTIFF keys and PROJ-version-proof text."""
    if geobox.crs is None:
        raise ValueError("grid has no CRS: a COG needs a georeferenced grid")
    epsg = geobox.crs.epsg
    return f"EPSG:{epsg}" if epsg is not None else geobox.crs.to_wkt()


def _write_cog(
    path: Path,
    array: np.ndarray,
    geobox: GeoBox,
    *,
    resampling: str,
    colormap: Colormap | None = None,
    description: str,
    unit: str = "",
    tags: Mapping[str, str] | None = None,
) -> Path:
    """Write one uint8 band as a COG (internal tiles, overviews, nodata 255, band metadata)."""
    if array.dtype != np.uint8 or array.shape != (geobox.height, geobox.width):
        raise ValueError(
            f"{path.name}: expected a uint8 array of shape {(geobox.height, geobox.width)}, "
            f"got {array.dtype} {array.shape}; cast or crop the array to the tile's GeoBox"
        )
    profile = {
        "driver": "COG",
        "width": geobox.width,
        "height": geobox.height,
        "count": 1,
        "dtype": "uint8",
        "crs": _rasterio_crs(geobox),
        "transform": geobox.affine,
        "nodata": NODATA_CODE,
        "overview_resampling": resampling,
        **_COG_OPTIONS,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # rasterio buffers COG writes in memory and runs GDAL's CreateCopy on close, which is when
    # the colour table, nodata and overviews are laid out in COG order.
    with rasterio.Env(**_GDAL_ENV), rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)
        if colormap is not None:
            dst.write_colormap(1, dict(colormap))
        # Description, unit and band tags go into the GDAL_METADATA TIFF tag: no sidecar.
        dst.set_band_description(1, description)
        if unit:
            dst.set_band_unit(1, unit)
        if tags:
            dst.update_tags(1, **dict(tags))
    return path


def write_class_cog(
    path: Path,
    classes: np.ndarray,
    geobox: GeoBox,
    colormap: Colormap,
    names: ClassNames | None = None,
) -> Path:
    """Class codes as a paletted COG; nearest overviews so no code is ever invented.

    With `names`, the band metadata lists `CLASS_<code>=<name>` and `<path>.aux.xml` holds the
    category names and attribute table that `gdalinfo` and QGIS show.
    """
    tags = {f"CLASS_{code}": name for code, name in sorted((names or {}).items())}
    _write_cog(
        path, classes, geobox, resampling="NEAREST", colormap=colormap,
        description=CLASS_BAND, tags=tags,
    )  # fmt: skip
    if names:
        write_class_sidecar(path, names, colormap)
    return path


def write_confidence_cog(path: Path, confidence: np.ndarray, geobox: GeoBox) -> Path:
    """Confidence 0..100 as a COG; averaged overviews (GDAL skips nodata when averaging)."""
    return _write_cog(
        path, confidence, geobox, resampling="AVERAGE",
        description=CONFIDENCE_BAND, unit=CONFIDENCE_UNIT,
    )  # fmt: skip


def sidecar_path(path: Path) -> Path:
    """Where GDAL looks for a raster's PAM metadata: `<file>.aux.xml` beside it."""
    return path.with_name(path.name + ".aux.xml")


def category_names(names: ClassNames) -> ET.Element:
    """GDAL `CategoryNames`: entry i names code i; codes without a class get an empty name."""
    element = ET.Element("CategoryNames")
    for code in range(max(names) + 1):
        ET.SubElement(element, "Category").text = names.get(code, "")
    return element


def _rat_field(table: ET.Element, index: int, name: str, kind: int, usage: int) -> None:
    field = ET.SubElement(table, "FieldDefn", index=str(index))
    ET.SubElement(field, "Name").text = name
    ET.SubElement(field, "Type").text = str(kind)
    ET.SubElement(field, "Usage").text = str(usage)


def attribute_table(names: ClassNames, colormap: Colormap) -> ET.Element:
    """A thematic GDAL raster attribute table: one row per class with its code, name, colour."""
    table = ET.Element("GDALRasterAttributeTable", tableType="thematic")
    for index, (name, kind, usage) in enumerate(_RAT_COLUMNS):
        _rat_field(table, index, name, kind, usage)
    for row, code in enumerate(sorted(names)):
        values = [code, names[code], *colormap.get(code, (0, 0, 0, 0))]
        element = ET.SubElement(table, "Row", index=str(row))
        for value in values:
            ET.SubElement(element, "F").text = str(value)
    return table


def _write_xml(path: Path, root: ET.Element) -> Path:
    """Indented UTF-8 XML with a final newline: the same bytes for the same tree."""
    ET.indent(root)
    path.write_text(ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")
    return path


def _write_sidecar(path: Path, *elements: ET.Element) -> Path:
    """A PAM `.aux.xml` for band 1 of `path` holding `elements` (category names, RAT)."""
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    band.extend(elements)
    return _write_xml(sidecar_path(path), root)


def write_class_sidecar(path: Path, names: ClassNames, colormap: Colormap) -> Path:
    """`<path>.aux.xml` with the category names and attribute table of a class raster."""
    return _write_sidecar(path, category_names(names), attribute_table(names, colormap))


@dataclass(frozen=True)
class MosaicLayout:
    """The pixel grid covering a set of tiles and where each tile's top-left pixel falls."""

    crs: str  # "EPSG:n" where possible: WKT text changes with the PROJ database version
    transform: Affine
    width: int
    height: int
    offsets: tuple[tuple[int, int], ...]  # (row, col) per tile, in input order


def _grid_offset(value: float, step: float, what: str) -> int:
    """Whole number of pixels in `value / step`, or an error if tiles are misaligned."""
    pixels = value / step
    if not math.isclose(pixels, round(pixels), abs_tol=1e-6):
        raise MosaicError(
            f"tile {what} is {pixels:.6f} pixels from the mosaic origin: tiles must share one "
            "pixel grid (same grid origin and resolution)"
        )
    return round(pixels)


def mosaic_layout(geoboxes: Sequence[GeoBox]) -> MosaicLayout:
    """The union grid of `geoboxes`; all must share CRS, resolution and pixel alignment."""
    if not geoboxes:
        raise MosaicError("no tiles to mosaic: pass at least one tile")
    first = geoboxes[0].affine
    for gb in geoboxes:
        if gb.crs != geoboxes[0].crs or (gb.affine.a, gb.affine.e) != (first.a, first.e):
            raise MosaicError(
                f"tiles differ in CRS or resolution ({gb.crs}, {gb.resolution} vs "
                f"{geoboxes[0].crs}, {geoboxes[0].resolution}): publish one grid per mosaic"
            )
        if gb.affine.b or gb.affine.d:
            raise MosaicError("rotated tile geoboxes are not supported in a mosaic")
    x0 = min(gb.affine.c for gb in geoboxes)
    y0 = max(gb.affine.f for gb in geoboxes)
    x1 = max(gb.affine.c + gb.width * first.a for gb in geoboxes)
    y1 = min(gb.affine.f + gb.height * first.e for gb in geoboxes)
    offsets = tuple(
        (
            _grid_offset(gb.affine.f - y0, first.e, "row"),
            _grid_offset(gb.affine.c - x0, first.a, "column"),
        )
        for gb in geoboxes
    )
    return MosaicLayout(
        crs=_rasterio_crs(geoboxes[0]),
        transform=Affine(first.a, 0.0, x0, 0.0, first.e, y0),
        width=_grid_offset(x1 - x0, first.a, "width"),
        height=_grid_offset(y1 - y0, first.e, "height"),
        offsets=offsets,
    )


def _color_table(colormap: Colormap) -> ET.Element:
    """A full 256-entry GDAL colour table; codes without a colour are transparent black."""
    table = ET.Element("ColorTable")
    for code in range(256):
        r, g, b, a = colormap.get(code, (0, 0, 0, 0))
        ET.SubElement(table, "Entry", c1=str(r), c2=str(g), c3=str(b), c4=str(a))
    return table


def _simple_source(
    href: str, shape: tuple[int, int], offset: tuple[int, int], factor: int = 1, band: int = 1
) -> ET.Element:
    """Band `band` of one tile placed at `offset` (row, col) in the mosaic, read 1:1 (or `factor`
    times coarser, in an overview VRT, where GDAL then reads the tile COG's own overview)."""
    (rows, cols), (row, col) = shape, offset
    source = ET.Element("SimpleSource")
    ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = href
    ET.SubElement(source, "SourceBand").text = str(band)
    ET.SubElement(source, "SrcRect", xOff="0", yOff="0", xSize=str(cols), ySize=str(rows))
    dst = {"xOff": col, "yOff": row, "xSize": cols, "ySize": rows}
    ET.SubElement(source, "DstRect", {k: f"{v / factor:g}" for k, v in dst.items()})
    return source


def _band_metadata(names: ClassNames) -> ET.Element:
    """VRT band `Metadata` with `CLASS_<code>=<name>`, as the class COGs carry it."""
    metadata = ET.Element("Metadata")
    for code, name in sorted(names.items()):
        ET.SubElement(metadata, "MDI", key=f"CLASS_{code}").text = name
    return metadata


@dataclass(frozen=True)
class MosaicBands:
    """What the tiles of a mosaic hold: `count` bands of `dtype`, `nodata`, a colour table on
    band 1 (`colormap`, codes without a colour transparent) and band 1's description."""

    count: int = 1
    dtype: str = "uint8"
    nodata: float | None = NODATA_CODE
    colormap: Colormap | None = None
    description: str | None = None


_GDAL_TYPES = {
    "uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
    "float32": "Float32", "float64": "Float64",
}  # fmt: skip


def write_mosaic_vrt(
    path: Path,
    sources: Sequence[tuple[Path, GeoBox]],
    colormap: Colormap | None = None,
    names: ClassNames | None = None,
    bands: MosaicBands | None = None,
) -> Path:
    """A GDAL VRT mosaicking COGs on one pixel grid, referenced by paths relative to the VRT:
    a class map (single-band uint8 with `colormap`) unless `bands` says otherwise.

    With `names`, the band carries category names and an attribute table (standard VRT elements).
    GDAL gives a VRT its sources' overviews only when the band has a single source, so a mosaic
    of several tiles names overview VRTs beside it (`<stem>.x2.vrt`, `.x4`, … down to about
    256 px): the same tiles at 2, 4, … times the pixel size, which GDAL reads from each tile
    COG's own overviews (QGIS zoomed out reads kilobytes, not every tile at full resolution).
    """
    if bands is None:
        bands = MosaicBands(colormap=colormap, description=CLASS_BAND)
    layout = mosaic_layout([gb for _, gb in sources])
    hrefs = [Path(os.path.relpath(tif, path.parent)).as_posix() for tif, _ in sources]
    overviews = []
    factor = 2
    while len(sources) > 1 and max(layout.width, layout.height) / factor >= 256:
        overview = path.with_name(f"{path.stem}.x{factor}.vrt")
        _mosaic_xml(overview, sources, hrefs, layout, bands, None, factor, [])
        overviews.append(overview.name)
        factor *= 2
    return _mosaic_xml(path, sources, hrefs, layout, bands, names, 1, overviews)


def _mosaic_xml(
    path: Path, sources: Sequence[tuple[Path, GeoBox]], hrefs: list[str], layout: MosaicLayout,
    bands: MosaicBands, names: ClassNames | None, factor: int, overviews: list[str],
) -> Path:  # fmt: skip
    """The mosaic VRT `factor` times coarser than the tiles (1: full resolution)."""
    width, height = -(-layout.width // factor), -(-layout.height // factor)
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = layout.crs  # GDAL assumes x,y (GIS) axis order
    transform = layout.transform @ Affine.scale(factor)
    ET.SubElement(root, "GeoTransform").text = ", ".join(
        repr(float(v)) for v in transform.to_gdal()
    )
    for b in range(1, bands.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=_GDAL_TYPES[bands.dtype], band=str(b))
        if b == 1 and bands.description:
            ET.SubElement(band, "Description").text = bands.description
        if b == 1 and names:
            band.append(_band_metadata(names))
        if bands.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = f"{bands.nodata:g}"
        if b == 1 and bands.colormap is not None:
            ET.SubElement(band, "ColorInterp").text = "Palette"
            band.append(_color_table(bands.colormap))
        if b == 1 and names and bands.colormap is not None:
            band.extend([category_names(names), attribute_table(names, bands.colormap)])
        for name in overviews:
            overview = ET.SubElement(band, "Overview")
            ET.SubElement(overview, "SourceFilename", relativeToVRT="1").text = name
            ET.SubElement(overview, "SourceBand").text = str(b)
        for href, (_, gb), offset in zip(hrefs, sources, layout.offsets, strict=True):
            band.append(_simple_source(href, (gb.height, gb.width), offset, factor, b))
    return _write_xml(path, root)


def write_mosaic_cog(path: Path, vrt: Path) -> Path:
    """The whole mosaic as one paletted COG (what users who do not read VRT ask for).

    The band description and `CLASS_<code>` metadata travel inside the COG; the VRT's category
    names and attribute table go to `<path>.aux.xml` (PAM is off while GDAL writes, so the
    sidecar is ours and byte-stable).
    """
    from rasterio.shutil import copy as gdal_copy

    with rasterio.Env(**_GDAL_ENV):  # its own overviews, from full resolution (not the VRT's)
        gdal_copy(
            str(vrt),
            str(path),
            driver="COG",
            overview_resampling="NEAREST",
            overviews="IGNORE_EXISTING",
            **_COG_OPTIONS,
        )
    root = ET.parse(vrt).getroot()
    classes = [
        *root.iterfind("VRTRasterBand/CategoryNames"),
        *root.iterfind("VRTRasterBand/GDALRasterAttributeTable"),
    ]
    if classes:
        _write_sidecar(path, *classes)
    return path
