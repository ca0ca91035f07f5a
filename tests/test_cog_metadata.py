"""Class COGs, the VRT and the mosaic COG carry category names GDAL reports; confidence has a unit.

Read back with the tools users have: `gdalinfo` (Debian `gdal-bin`, skipped where it is not
installed) and the GDAL C API of the libgdal that rasterio ships (GDAL 3.10), through ctypes.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rio_cogeo import cog_validate

from pivotmap.tasks import cog
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.nomenclature import NODATA_CODE, LandCoverClass, Nomenclature

GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=64, origin_x=500000, origin_y=5630000)
NAMES = {1: "Tree cover", 2: "Cropland", 4: "Open water"}  # a gap at code 3 on purpose


@pytest.fixture(scope="module")
def nomenclature() -> Nomenclature:
    colours = {1: "#006400", 2: "#f096ff", 4: "#0064c8"}
    classes = [
        LandCoverClass(code=c, name=n, color=colours[c], description=f"{n}.")
        for c, n in NAMES.items()
    ]
    return Nomenclature(name="Test LC", classes=classes)


def _write_products(folder: Path, nomenclature: Nomenclature) -> dict[str, Path]:
    """Two class tiles, a confidence tile, the VRT and the mosaic COG, as publish writes them."""
    rng = np.random.default_rng(0)
    names = {c.code: c.name for c in nomenclature.classes}
    tiles = []
    for ix in (0, 1):
        tile = GRID.tile(ix, 0)
        classes = rng.choice([1, 2, 4, NODATA_CODE], tile.geobox.shape).astype(np.uint8)
        path = folder / f"{tile.id}_class.tif"
        tiles.append(
            (
                cog.write_class_cog(path, classes, tile.geobox, nomenclature.colormap(), names),
                tile.geobox,
            )
        )
    confidence = rng.integers(0, 101, GRID.tile(0, 0).geobox.shape).astype(np.uint8)
    vrt = cog.write_mosaic_vrt(folder / "mosaic_class.vrt", tiles, nomenclature.colormap(), names)
    return {
        "class": tiles[0][0],
        "confidence": cog.write_confidence_cog(
            folder / "conf.tif", confidence, GRID.tile(0, 0).geobox
        ),
        "vrt": vrt,
        "mosaic_cog": cog.write_mosaic_cog(folder / "mosaic_class.tif", vrt),
    }


@pytest.fixture(scope="module")
def products(tmp_path_factory, nomenclature) -> dict[str, Path]:
    return _write_products(tmp_path_factory.mktemp("cogs"), nomenclature)


def _gdalinfo(path: Path) -> tuple[dict, str]:
    """`gdalinfo -json` and plain `gdalinfo` output, from GDAL's own command-line tool."""
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo is not installed (Debian: apt-get install gdal-bin)")
    # GDAL's defaults, as a user's shell has them: pivotmap's GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR
    # (set for the test session) hides every sidecar, `.aux.xml` included.
    env = {k: v for k, v in os.environ.items() if k != "GDAL_DISABLE_READDIR_ON_OPEN"}
    run = {"check": True, "capture_output": True, "text": True, "env": env}
    text = subprocess.run(["gdalinfo", str(path)], **run).stdout
    return json.loads(subprocess.run(["gdalinfo", "-json", str(path)], **run).stdout), text


def _libgdal() -> ctypes.CDLL:
    """The libgdal that rasterio loaded (bundled in its wheel)."""
    libs = sorted((Path(rasterio.__file__).parent.parent / "rasterio.libs").glob("libgdal*.so*"))
    if not libs:
        pytest.skip("rasterio's wheel ships no libgdal here; gdalinfo covers the check")
    lib = ctypes.CDLL(str(libs[0]))
    handle, text = ctypes.c_void_p, ctypes.c_char_p
    for name, restype, argtypes in [
        ("GDALOpen", handle, [text, ctypes.c_int]),
        ("GDALGetRasterBand", handle, [handle, ctypes.c_int]),
        ("GDALGetDefaultRAT", handle, [handle]),
        ("GDALRATGetRowCount", ctypes.c_int, [handle]),
        ("GDALRATGetColOfUsage", ctypes.c_int, [handle, ctypes.c_int]),
        ("GDALRATGetValueAsString", text, [handle, ctypes.c_int, ctypes.c_int]),
        ("GDALGetRasterCategoryNames", ctypes.POINTER(text), [handle]),
        ("GDALClose", None, [handle]),
    ]:
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def _gdal_api_classes(path: Path) -> tuple[dict[int, str], list[str]]:
    """(RAT code -> name, category names) of band 1, as any GDAL application reads them."""
    lib = _libgdal()
    # Drivers registered, PAM on and sibling files listed: GDAL's defaults, as readers have them.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="FALSE"):
        ds = lib.GDALOpen(str(path).encode(), 0)
        assert ds, f"GDAL cannot open {path}"
        try:
            band = lib.GDALGetRasterBand(ds, 1)
            rat = lib.GDALGetDefaultRAT(band)  # also loads the PAM file GTiff reads lazily
            rows = {}
            if rat:
                value, name = (lib.GDALRATGetColOfUsage(rat, u) for u in (5, 2))  # MinMax, Name
                for r in range(lib.GDALRATGetRowCount(rat)):
                    code = int(lib.GDALRATGetValueAsString(rat, r, value))
                    rows[code] = lib.GDALRATGetValueAsString(rat, r, name).decode()
            names, cats = [], lib.GDALGetRasterCategoryNames(band)
            while cats and cats[len(names)] is not None:
                names.append(cats[len(names)].decode())
        finally:
            lib.GDALClose(ds)
    return rows, names


@pytest.mark.parametrize("key", ["class", "vrt", "mosaic_cog"])
def test_gdalinfo_lists_class_names_and_attribute_table(products, key):
    info, text = _gdalinfo(products[key])
    band = info["bands"][0]
    assert band["description"] == "land-cover class"
    assert band["categories"] == ["", "Tree cover", "Cropland", "", "Open water"]
    assert "Categories:" in text and "4: Open water" in text
    rat = info["rat"]
    assert [f["name"] for f in rat["fieldDefn"]][:2] == ["value", "class_name"]
    assert [row["f"][:2] for row in rat["row"]] == [
        [1, "Tree cover"],
        [2, "Cropland"],
        [4, "Open water"],
    ]
    # Colours stay, in the colour table and in the attribute table alike.
    assert band["colorTable"]["entries"][4] == [0, 100, 200, 255]
    assert rat["row"][2]["f"][2:] == [0, 100, 200, 255]


@pytest.mark.parametrize("key", ["class", "vrt", "mosaic_cog"])
def test_gdal_api_reads_the_attribute_table_and_category_names(products, key):
    rows, names = _gdal_api_classes(products[key])
    assert rows == NAMES
    assert names == ["", "Tree cover", "Cropland", "", "Open water"]


def test_class_names_also_travel_inside_the_tiff(products):
    """Without its sidecar (a lone download), the COG still names its band and classes."""
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(products["class"]) as src:
        assert src.descriptions == ("land-cover class",)
        tags = src.tags(1)
    assert {k: v for k, v in tags.items() if k.startswith("CLASS_")} == {
        f"CLASS_{code}": name for code, name in NAMES.items()
    }


def test_confidence_cog_has_description_and_percent_unit(products):
    path = products["confidence"]
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
        assert src.descriptions == ("classifier confidence",)
        assert src.units == ("%",)
    assert not cog.sidecar_path(path).exists()  # stored in the TIFF's GDAL_METADATA tag
    if shutil.which("gdalinfo"):
        info, text = _gdalinfo(path)
        assert info["bands"][0]["description"] == "classifier confidence"
        assert "Unit Type: %" in text


def test_cogs_stay_valid_and_byte_identical(tmp_path, nomenclature):
    first = _write_products(tmp_path / "a", nomenclature)
    _write_products(tmp_path / "b", nomenclature)
    for key in ("class", "confidence", "mosaic_cog"):
        is_valid, errors, _ = cog_validate(str(first[key]), quiet=True)
        assert is_valid and not errors, (key, errors)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert any(f.endswith("_class.tif.aux.xml") for f in files)
    assert "mosaic_class.tif.aux.xml" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_class_cog_without_names_writes_no_sidecar(tmp_path, nomenclature):
    """The old call (no names) keeps working and leaves no `.aux.xml` behind."""
    tile = GRID.tile(0, 0)
    classes = np.ones(tile.geobox.shape, np.uint8)
    path = cog.write_class_cog(tmp_path / "c.tif", classes, tile.geobox, nomenclature.colormap())
    assert not list(tmp_path.glob("*.aux.xml"))
    with rasterio.open(path) as src:
        assert src.descriptions == ("land-cover class",)


def test_mosaic_vrt_of_several_tiles_reads_the_tiles_overviews(tmp_path, nomenclature):
    """GDAL gives a VRT of several sources no overviews of its own: the mosaic names overview
    VRTs, so a zoomed-out read (QGIS, titiler) takes the tile COGs' overviews."""
    grid = GridSpec(crs="EPSG:32631", resolution=10, tile_size=1024, origin_x=5e5, origin_y=5.6e6)
    rng = np.random.default_rng(1)
    tiles = []
    for ix in (0, 1):
        tile = grid.tile(ix, 0)
        classes = rng.choice([1, 2, 4], tile.geobox.shape).astype(np.uint8)
        path = tmp_path / f"{tile.id}_class.tif"
        tiles.append(
            (cog.write_class_cog(path, classes, tile.geobox, nomenclature.colormap()), tile.geobox)
        )
    vrt = cog.write_mosaic_vrt(tmp_path / "mosaic_class.vrt", tiles, nomenclature.colormap())
    names = sorted(p.name for p in tmp_path.glob("*.vrt"))
    assert names == [f"mosaic_class{s}.vrt" for s in ("", ".x2", ".x4", ".x8")]
    with rasterio.open(vrt) as src:
        assert src.overviews(1) == [2, 4, 8]
        coarse = src.read(1, out_shape=(512, 1024))  # served from the x2 overview VRT
    with rasterio.open(tiles[1][0]) as tile:
        assert tile.overviews(1)[0] == 2
        tile_x2 = tile.read(1, out_shape=(512, 512))  # the tile COG's own overview
    np.testing.assert_array_equal(coarse[:, 512:], tile_x2)
    shutil.move(tmp_path, tmp_path.with_name("moved"))  # relative paths: the mosaic relocates
    with rasterio.open(tmp_path.with_name("moved") / "mosaic_class.vrt") as src:
        np.testing.assert_array_equal(src.read(1, out_shape=(512, 1024)), coarse)
