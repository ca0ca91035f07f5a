"""Tile ids, tile lookup and region errors of the grid."""

import pytest

from pivotmap.tasks.grid import GridSpec, RegionError


def test_eea_style_ids_round_trip():
    grid = GridSpec(crs="EPSG:3035", resolution=10, tile_size=1000)
    tiles = grid.tiles_for_bbox((3600000, 2890000, 3615000, 2895000), "EPSG:3035")
    assert [t.id for t in tiles] == ["E3600N2890", "E3610N2890"]
    assert grid.tile_from_id("E3610N2890") == tiles[1]
    assert tiles[0].geobox.shape == (1000, 1000)


def test_metre_ids_for_unaligned_origins():
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=64, origin_x=501360, origin_y=5629040
    )
    (tile,) = grid.tiles_for_bbox((501360, 5629040, 502000, 5629680), "EPSG:32631")
    assert tile.id == "E501360mN5629040m"
    assert grid.tile_from_id(tile.id) == tile


def test_one_id_format_per_grid():
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=64, origin_x=500000, origin_y=5630000
    )
    ids = [t.id for t in grid.tiles_for_bbox((500000, 5630000, 501280, 5631280), "EPSG:32631")]
    assert ids == [
        "E500000mN5630640m",
        "E500640mN5630640m",
        "E500000mN5630000m",
        "E500640mN5630000m",
    ]


def test_lonlat_region_and_union_extent():
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=64, origin_x=500000, origin_y=5630000
    )
    tiles = grid.tiles_for_bbox((3.0, 50.83, 3.012, 50.838), "EPSG:4326")
    extent = grid.union_geobox(tiles)
    assert len(tiles) >= 2
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        assert extent[rows, cols] == tile.geobox


def test_region_outside_extent_is_a_clear_error():
    grid = GridSpec(
        crs="EPSG:3035", resolution=10, tile_size=1000, extent=(900000, 900000, 7400000, 5500000)
    )
    with pytest.raises(RegionError, match="outside the grid's valid extent"):
        grid.tiles_for_bbox((-75.0, 40.0, -74.0, 41.0), "EPSG:4326")


def test_geographic_grid_is_refused():
    with pytest.raises(RegionError, match="not projected"):
        GridSpec(crs="EPSG:4326", resolution=0.0001, tile_size=100)
