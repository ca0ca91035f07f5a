"""The quicklook is a readable map: legend, grid coordinates, scale bar, CRS, period and version."""

from __future__ import annotations

import re

import matplotlib.image
import numpy as np
import pytest
from matplotlib.text import Text
from odc.geo.geobox import GeoBox

from pivotmap.tasks import quicklook
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.nomenclature import NODATA_CODE, LandCoverClass, Nomenclature

# Four 256-pixel tiles of 10 m: a 5.12 km square whose west edge is easting 500000.
GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=256, origin_x=500000, origin_y=5630000)
PERIOD, VERSION = "2024-01-01 – 2024-12-31", "v7"


@pytest.fixture(scope="module")
def nomenclature() -> Nomenclature:
    classes = [
        LandCoverClass(code=1, name="Tree cover", color="#006400", description="Trees."),
        LandCoverClass(code=2, name="Cropland", color="#f096ff", description="Crops."),
    ]
    return Nomenclature(name="Test LC", classes=classes)


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, GeoBox]]:
    rng = np.random.default_rng(0)
    out = []
    for ix in (0, 1):
        for iy in (0, 1):
            tile = GRID.tile(ix, iy)
            classes = rng.integers(1, 3, tile.geobox.shape).astype(np.uint8)
            classes[:10, :10] = NODATA_CODE
            out.append((classes, tile.geobox))
    return out


def _texts(figure) -> list[str]:
    """Every text the figure draws: titles, labels, tick labels, legend, scale bar."""
    figure.canvas.draw()  # tick labels get their text when drawn
    return [t.get_text() for t in figure.findobj(Text) if t.get_visible() and t.get_text()]


def test_quicklook_names_period_version_and_crs(tiles, nomenclature):
    figure = quicklook.render_quicklook(
        tiles, nomenclature, "Test land cover", period=PERIOD, version=VERSION
    )
    texts = _texts(figure)
    assert "Test land cover" in texts
    subtitle = next(t for t in texts if "CRS" in t)
    assert f"period {PERIOD}" in subtitle and f"version {VERSION}" in subtitle
    assert "EPSG:32631 (WGS 84 / UTM zone 31N)" in subtitle
    assert {"1 Tree cover", "2 Cropland", "no data", "Test LC"} <= set(texts)  # legend kept


def test_quicklook_has_scale_bar_and_coordinate_grid(tiles, nomenclature):
    figure = quicklook.render_quicklook(tiles, nomenclature, "t")
    texts = _texts(figure)
    assert "1 km" in texts  # a fifth of 5.12 km, rounded down to 1-2-5
    assert {"easting (m)", "northing (m)"} <= set(texts)
    axes = figure.axes[0]
    boxes = [gb.boundingbox for _, gb in tiles]
    assert axes.get_xlim() == pytest.approx((500000, 505120))
    assert min(b.left for b in boxes) == 500000 and max(b.right for b in boxes) == 505120
    assert sorted(axes.get_ylim()) == pytest.approx(
        [min(b.bottom for b in boxes), max(b.top for b in boxes)]
    )
    for ticks, labels, (lo, hi) in [
        (axes.get_xticks(), axes.get_xticklabels(), axes.get_xlim()),
        (axes.get_yticks(), axes.get_yticklabels(), sorted(axes.get_ylim())),
    ]:
        shown = [v for v in ticks if lo <= v <= hi]
        # Map coordinates written in full: no offset, no scientific notation.
        assert len(shown) >= 3
        assert {f"{v:.0f}" for v in shown} <= {t.get_text() for t in labels}
    assert any(line.get_visible() for line in axes.get_xgridlines())


def test_geographic_scale_bar_in_kilometres(nomenclature):
    """On a lon/lat grid the bar is measured in metres at the map's latitude, not in degrees."""
    geobox = GeoBox.from_bbox((4.0, 60.0, 4.4, 60.1), "EPSG:4326", resolution=0.001)
    classes = np.ones(geobox.shape, np.uint8)
    texts = _texts(quicklook.render_quicklook([(classes, geobox)], nomenclature, "geo"))
    # 0.4° of longitude at 60° N is about 22 km: a fifth is 4.4 km, so the bar shows 2 km.
    assert "2 km" in texts and "longitude (°)" in texts
    assert any("EPSG:4326" in t for t in texts)


@pytest.mark.parametrize(
    ("span", "length"), [(5120, 1000), (1000, 200), (99, 10), (22_000, 2000), (7.5e5, 1e5)]
)
def test_nice_length_is_one_two_five_below_a_fifth(span, length):
    assert quicklook.nice_length(span) == pytest.approx(length)


def test_write_quicklook_png_is_deterministic(tmp_path, tiles, nomenclature):
    paths = [
        quicklook.write_quicklook(
            tmp_path / f"q{i}.png", tiles, nomenclature, "t", period=PERIOD, version=VERSION
        )
        for i in (0, 1)
    ]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[0].read_bytes() == paths[1].read_bytes()
    height, width = matplotlib.image.imread(paths[0]).shape[:2]
    assert 900 <= width <= 1300 and 600 <= height <= 900  # 10 x 7 in at 120 dpi, trimmed


def test_old_call_still_works(tmp_path, tiles, nomenclature):
    """publish.py's current call (no period or version) still renders, with the CRS shown."""
    path = quicklook.write_quicklook(tmp_path / "q.png", tiles, nomenclature, "t")
    assert path.stat().st_size > 0
    subtitle = quicklook.subtitle(tiles[0][1])
    assert re.fullmatch(r"CRS EPSG:32631 \(.+\)", subtitle)
