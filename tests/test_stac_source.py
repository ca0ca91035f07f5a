"""Item search in the real Flanders static catalogue, and the errors a wrong config gets."""

import datetime as dt

import pytest
from odc.geo.geom import box

from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.load import load_s1, load_s2
from pivotmap.tasks.stac_source import SourceError, require_items, search_items

PATCH = (501360, 5629040, 502000, 5629680)
START, END = dt.date(2017, 8, 1), dt.date(2018, 11, 30)


def _region():
    return box(*PATCH, "EPSG:32631").to_crs("EPSG:4326")


def test_static_catalogue_search_and_period_filter(flanders):
    url = str(flanders / "catalog.json")
    s2 = search_items("static", url, "sentinel-2-l2a", _region(), START, END)
    s1 = search_items("static", url, "sentinel-1-rtc", _region(), START, END)
    assert (len(s2), len(s1)) == (118, 159)
    autumn = search_items(
        "static", url, "sentinel-2-l2a", _region(), dt.date(2017, 9, 1), dt.date(2017, 9, 30)
    )
    assert 0 < len(autumn) < 20 and all(i.datetime.month == 9 for i in autumn)


def test_missing_catalogue_unknown_collection_and_empty_results(flanders, tmp_path):
    with pytest.raises(SourceError, match="STAC catalogue not found: .*nowhere/catalog.json"):
        search_items(
            "static",
            str(tmp_path / "nowhere/catalog.json"),
            "sentinel-2-l2a",
            _region(),
            START,
            END,
        )
    with pytest.raises(
        SourceError,
        match="'landsat-c2-l2' is not in catalogue .*has: sentinel-1-rtc, sentinel-2-l2a",
    ):
        search_items(
            "static", str(flanders / "catalog.json"), "landsat-c2-l2", _region(), START, END
        )
    far = box(10.0, 45.0, 10.1, 45.1, "EPSG:4326")
    items = search_items(
        "static", str(flanders / "catalog.json"), "sentinel-2-l2a", far, START, END
    )
    with pytest.raises(SourceError, match="no items of 'sentinel-2-l2a'"):
        require_items(items, "sentinel-2-l2a", "flanders", START, END)


def test_s2_masking_follows_scl_and_s1_is_in_db(flanders):
    import rasterio

    url = str(flanders / "catalog.json")
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=64, origin_x=501360, origin_y=5629040
    )
    (tile,) = grid.tiles_for_bbox(PATCH, "EPSG:32631")
    items = search_items("static", url, "sentinel-2-l2a", _region(), START, dt.date(2017, 10, 31))
    ds = load_s2(items, tile.geobox, (0, 1, 3, 8, 9, 10))
    checked = 0
    for k, item in enumerate(items):
        with rasterio.open(item.assets["scl"].get_absolute_href()) as src:
            scl = src.read(1).repeat(2, axis=0).repeat(2, axis=1)  # 20 m → 10 m, nearest
        masked = ds.B04.isel(time=k).isnull().values
        assert (
            masked == ((scl == 0) | (scl == 1) | (scl == 3) | (scl >= 8) & (scl <= 10))
        ).all(), item.id
        with rasterio.open(item.assets["red"].get_absolute_href()) as src:
            red = src.read(1) * 1e-4
        clear = ~masked
        if clear.any():
            assert abs(ds.B04.isel(time=k).values[clear] - red[clear]).max() < 1e-6
            checked += 1
    assert checked > 5
    s1 = search_items("static", url, "sentinel-1-rtc", _region(), START, dt.date(2017, 8, 31))
    db = load_s1(s1, tile.geobox)
    assert -30 < float(db.VV.mean()) < 0 and float(db.VH.mean()) < float(db.VV.mean())
