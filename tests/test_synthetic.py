"""The synthetic demo region: STAC layout, COG validity, determinism and learnable content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rio_cogeo import cog_validate

from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.nomenclature import load_nomenclature
from pivotmap.tasks.synthetic import (
    S1_ASSET_KEYS,
    S2_ASSET_KEYS,
    DemoRegion,
    generate_demo_region,
)

SMALL = {"tiles_x": 1, "tiles_y": 1, "tile_size": 32, "start": "2023-06-01", "end": "2023-07-31"}
CLEAR = (4, 5, 6)  # SCL vegetation, not vegetated, water
FOREST, BUILT_UP, WATER, CEREALS, MAIZE = 4, 5, 6, 1, 2


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> DemoRegion:
    """One 32 px tile over two months: quick structural checks."""
    return generate_demo_region(tmp_path_factory.mktemp("small") / "demo", seed=7, **SMALL)


@pytest.fixture(scope="module")
def summer(tmp_path_factory: pytest.TempPathFactory) -> DemoRegion:
    """The default 2x2 tiles of 64 px from May to August: content checks."""
    out = tmp_path_factory.mktemp("summer") / "demo"
    return generate_demo_region(out, start="2023-05-01", end="2023-08-31")


def _read(path: Path | str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _items(region: DemoRegion, collection: str) -> list[pystac.Item]:
    catalog = pystac.Catalog.from_file(str(region.catalog_path))
    child = catalog.get_child(collection)
    assert child is not None, f"collection {collection} missing"
    return sorted(child.get_items(), key=lambda item: item.id)


def _on_disk(item: pystac.Item) -> dict:
    """The item JSON as written (pystac migrates `proj:epsg` to `proj:code` when reading)."""
    return json.loads(Path(item.get_self_href() or "").read_text())


def _band(item: pystac.Item, key: str) -> np.ndarray:
    return _read(item.assets[key].get_absolute_href()).astype(float)


def _to_20m(array: np.ndarray) -> np.ndarray:
    h, w = array.shape
    return array.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_region_is_tiled_exactly_by_the_grid(small: DemoRegion) -> None:
    assert small.crs == "EPSG:32631" and small.resolution == 10.0 and small.tile_size == 32
    assert small.grid_origin == (500000.0, 5630000.0)
    assert small.bbox == (500000.0, 5630000.0, 500320.0, 5630320.0)
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=32, origin_x=500000, origin_y=5630000
    )
    assert small.grid() == grid
    tiles = grid.tiles_for_bbox(small.bbox, small.crs)
    assert [t.id for t in tiles] == ["E500000mN5630000m"]  # 320 m tiles: ids in metres
    geobox = grid.union_geobox(tiles)
    with rasterio.open(small.labels_path) as src:
        assert (src.height, src.width) == geobox.shape
        assert src.transform.almost_equals(geobox.transform)
        assert src.crs.to_epsg() == 32631


def test_catalogue_is_self_contained_and_says_synthetic(small: DemoRegion) -> None:
    root = small.catalog_path.parent
    catalog = pystac.Catalog.from_file(str(small.catalog_path))
    assert "SYNTHETIC" in catalog.description and "seed 7" in catalog.description
    assert "NOT real Sentinel data" in catalog.description
    assert catalog.catalog_type == pystac.CatalogType.SELF_CONTAINED
    assert {c.id for c in catalog.get_children()} == {"sentinel-2-l2a", "sentinel-1-rtc"}
    # 2023-06-01 .. 2023-07-31 is 61 days: every 5th day gives 13 dates, every 6th 11
    assert (small.n_s2_items, small.n_s1_items) == (13, 11)
    assert len(_items(small, "sentinel-2-l2a")) == 13 and len(_items(small, "sentinel-1-rtc")) == 11
    for path in root.rglob("*.json"):
        text = path.read_text()
        assert str(root) not in text, f"absolute href in {path}"
        assert json.loads(text)["stac_version"] == "1.0.0"
    related = [link for link in catalog.links if link.rel == "related"]
    labels_item = pystac.Item.from_file(str(root / "labels" / "labels.json"))
    assert related and related[0].href == "./labels/labels.json"
    assert Path(labels_item.assets["lc"].get_absolute_href()) == small.labels_path
    assert "SYNTHETIC" in (root / "README.md").read_text()


def test_s2_items_follow_earth_search_layout(small: DemoRegion) -> None:
    for item in _items(small, "sentinel-2-l2a"):
        assert tuple(item.assets) == S2_ASSET_KEYS
        assert item.id.startswith("S2X_31UDS_") and item.id.endswith("_0_L2A")
        assert _on_disk(item)["properties"]["proj:epsg"] == 32631
        assert item.properties["proj:code"] == "EPSG:32631"  # as pystac presents it
        assert 0.0 <= item.properties["eo:cloud_cover"] <= 100.0
        for key, asset in item.assets.items():
            fields = asset.extra_fields
            res = 10 if key in ("blue", "green", "red", "nir") else 20
            assert fields["proj:shape"] == [320 // res, 320 // res], key
            assert fields["proj:transform"] == [res, 0.0, 500000.0, 0.0, -res, 5630320.0], key
            band = fields["raster:bands"][0]
            assert band["nodata"] == 0 and band["spatial_resolution"] == res
            assert band["data_type"] == ("uint8" if key == "scl" else "uint16")
            if key != "scl":
                assert (band["scale"], band["offset"]) == (0.0001, 0)
                assert fields["eo:bands"][0]["name"] == key
            payload = Path(asset.get_absolute_href()).read_bytes()
            assert fields["file:checksum"] == "1220" + hashlib.sha256(payload).hexdigest()


def test_s1_items_follow_planetary_computer_layout(small: DemoRegion) -> None:
    for item in _items(small, "sentinel-1-rtc"):
        assert tuple(item.assets) == S1_ASSET_KEYS
        props = _on_disk(item)["properties"]
        assert props["sat:orbit_state"] == "ascending"
        assert props["sar:polarizations"] == ["VV", "VH"]
        assert props["proj:epsg"] == 32631 and props["proj:shape"] == [16, 16]
        assert props["proj:transform"] == [20.0, 0.0, 500000.0, 0.0, -20.0, 5630320.0, 0, 0, 1]
        for key in S1_ASSET_KEYS:
            band = item.assets[key].extra_fields["raster:bands"][0]
            assert band == {"nodata": -32768.0, "data_type": "float32", "spatial_resolution": 20.0}
            with rasterio.open(item.assets[key].get_absolute_href()) as src:
                power = src.read(1)
                assert src.dtypes[0] == "float32" and src.nodata == -32768.0
            # linear power of land and water backscatter: roughly -35 .. +10 dB
            assert np.all(power > 10**-3.5) and np.all(power < 10.0), key


def test_all_rasters_are_valid_cogs_without_nodata_pixels(small: DemoRegion) -> None:
    tifs = sorted(small.catalog_path.parent.rglob("*.tif"))
    assert len(tifs) == 13 * 11 + 11 * 2 + 1
    for tif in tifs:
        valid, errors, _ = cog_validate(str(tif), quiet=True)
        assert valid, f"{tif}: {errors}"
    for item in _items(small, "sentinel-2-l2a"):
        for key in S2_ASSET_KEYS:
            assert np.all(_band(item, key) > 0), f"{item.id} {key} has nodata pixels"


def test_cloud_cover_is_the_share_of_cloudy_scl(summer: DemoRegion) -> None:
    covers = []
    for item in _items(summer, "sentinel-2-l2a"):
        scl = _band(item, "scl")
        expected = np.isin(scl, (3, 8, 9, 10)).mean() * 100
        assert item.properties["eo:cloud_cover"] == pytest.approx(expected, abs=1e-3)
        assert set(np.unique(scl)) <= set(range(2, 12))
        covers.append(expected)
    assert min(covers) == 0.0, "some dates should be clear"
    assert any(0 < c < 100 for c in covers), "some dates should be partly cloudy"


def test_scl_clouds_are_bright_and_shadows_dark(summer: DemoRegion) -> None:
    cloud, clear, high_min, clear_nir, shadow_nir = [], [], [], [], []
    for item in _items(summer, "sentinel-2-l2a"):
        scl = _band(item, "scl")
        blue = _to_20m(_band(item, "blue")) / 10000
        nir = _to_20m(_band(item, "nir")) / 10000
        cloud.append(blue[np.isin(scl, (8, 9))])
        clear.append(blue[np.isin(scl, CLEAR)])
        if np.any(scl == 3) and np.any(np.isin(scl, CLEAR)):
            shadow_nir.append(nir[scl == 3].mean())
            clear_nir.append(nir[np.isin(scl, CLEAR)].mean())
        if np.any(scl == 9):
            high_min.append(blue[scl == 9].min())
    cloud_blue, clear_blue = np.concatenate(cloud), np.concatenate(clear)
    assert cloud_blue.size > 100 and clear_blue.size > 100
    assert cloud_blue.mean() > 0.2 > 0.1 > clear_blue.mean()
    assert np.percentile(cloud_blue, 10) > np.percentile(clear_blue, 99)
    assert high_min and min(high_min) > 0.2, "high-probability cloud must be bright everywhere"
    assert shadow_nir and np.mean(shadow_nir) < 0.8 * np.mean(clear_nir)


def test_labels_cover_all_classes_with_a_few_unknown_parcels(summer: DemoRegion) -> None:
    labels = _read(summer.labels_path)
    assert labels.dtype == np.uint8 and labels.shape == (128, 128)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6}
    assert 0.01 < np.mean(labels == 0) < 0.2
    nomenclature = load_nomenclature(summer.nomenclature_path)
    assert nomenclature.codes == [1, 2, 3, 4, 5, 6] and nomenclature.unknown_codes == [0]
    assert nomenclature.by_code(4).name == "Broadleaf forest"
    with rasterio.open(summer.labels_path) as src:
        assert src.nodata == 0 and src.colormap(1)[4][:3] == (0x1F, 0x7A, 0x33)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = generate_demo_region(tmp_path / "a", seed=3, **SMALL)
    second = generate_demo_region(tmp_path / "b", seed=3, **SMALL)
    a, b = _digests(first.catalog_path.parent), _digests(second.catalog_path.parent)
    assert len(a) > 150 and a == b


def test_other_seed_gives_other_labels(tmp_path: Path) -> None:
    one = generate_demo_region(tmp_path / "a", seed=1, **SMALL | {"end": "2023-06-01"})
    two = generate_demo_region(tmp_path / "b", seed=2, **SMALL | {"end": "2023-06-01"})
    assert not np.array_equal(_read(one.labels_path), _read(two.labels_path))


def _clear_means(region: DemoRegion, months: set[int]) -> dict[int, dict[str, float]]:
    """Per class: mean NDVI, NIR and SWIR over clear 20 m pixels of the given months."""
    labels = _read(region.labels_path)[::2, ::2]
    sums: dict[int, list[np.ndarray]] = {c: [] for c in range(1, 7)}
    for item in _items(region, "sentinel-2-l2a"):
        if item.datetime is None or item.datetime.month not in months:
            continue
        scl = _band(item, "scl")
        red, nir = (_to_20m(_band(item, k)) / 10000 for k in ("red", "nir"))
        ndvi = (nir - red) / (nir + red)
        for code in sums:
            mask = np.isin(scl, CLEAR) & (labels == code)
            sums[code].append(np.stack([ndvi[mask], nir[mask]], axis=1))
    out = {}
    for code, parts in sums.items():
        values = np.concatenate(parts)
        assert len(values) > 20, f"class {code} has too few clear pixels"
        out[code] = {"ndvi": float(values[:, 0].mean()), "nir": float(values[:, 1].mean())}
    return out


def test_classes_are_separable_in_principle(summer: DemoRegion) -> None:
    july_august = _clear_means(summer, {7, 8})
    assert july_august[FOREST]["ndvi"] > july_august[BUILT_UP]["ndvi"] + 0.3
    assert july_august[WATER]["ndvi"] < 0
    assert july_august[WATER]["nir"] == min(m["nir"] for m in july_august.values())
    may = _clear_means(summer, {5})
    # phenology: cereals are green in May and harvested by August; maize the other way round
    assert may[CEREALS]["ndvi"] > july_august[CEREALS]["ndvi"] + 0.2
    assert july_august[MAIZE]["ndvi"] > may[MAIZE]["ndvi"] + 0.2


def test_s1_backscatter_separates_built_up_water_and_maize(summer: DemoRegion) -> None:
    labels = _read(summer.labels_path)[::2, ::2]
    vv = {c: [] for c in (MAIZE, BUILT_UP, WATER)}
    vh_maize = {5: [], 8: []}
    for item in _items(summer, "sentinel-1-rtc"):
        vv_db, vh_db = (10 * np.log10(_band(item, k)) for k in S1_ASSET_KEYS)
        for code in vv:
            vv[code].append(vv_db[labels == code].mean())
        if item.datetime is not None and item.datetime.month in vh_maize:
            vh_maize[item.datetime.month].append(vh_db[labels == MAIZE].mean())
    assert np.mean(vv[BUILT_UP]) > np.mean(vv[MAIZE]) + 5 > np.mean(vv[WATER]) + 10
    # maize VH rises with biomass from bare May soil to the August canopy
    assert np.mean(vh_maize[8]) > np.mean(vh_maize[5]) + 3


def test_rejects_bad_arguments_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tile_size"):
        generate_demo_region(tmp_path / "x", tile_size=33)
    with pytest.raises(ValueError, match="before start"):
        generate_demo_region(tmp_path / "x", start="2023-02-01", end="2023-01-01")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_demo_region(foreign, **SMALL)
    assert (foreign / "thesis.txt").read_text() == "keep me"


def test_regenerating_into_a_demo_folder_replaces_it(tmp_path: Path) -> None:
    generate_demo_region(tmp_path / "d", seed=5, **SMALL)
    (tmp_path / "d" / "catalog.json").unlink()  # as if the first run had crashed before the end
    region = generate_demo_region(tmp_path / "d", seed=5, **SMALL | {"end": "2023-06-10"})
    assert (region.n_s2_items, region.n_s1_items) == (2, 2)
    assert region.catalog_path.is_file()
    item_dirs = [p for p in (tmp_path / "d" / "sentinel-2-l2a").iterdir() if p.is_dir()]
    assert len(item_dirs) == 2, "items of the previous run must not linger"


def test_relative_output_folder_gives_readable_hrefs(tmp_path, monkeypatch) -> None:
    """`pivotmap demo --out demo-out` passes a relative folder: asset hrefs must still resolve."""
    monkeypatch.chdir(tmp_path)
    region = generate_demo_region(
        Path("rel-out"), tiles_x=1, tiles_y=1, tile_size=32, end="2023-01-20"
    )
    catalog = pystac.Catalog.from_file(str(region.catalog_path))
    item = next(catalog.get_items(recursive=True))
    href = item.assets[next(iter(item.assets))].get_absolute_href()
    assert Path(href).is_file(), href


# ---------------------------------------------------------------------------------------------
# Another place, another year (issue 15): each option changes what it says, nothing else.


def _scene(**options):
    from pivotmap.tasks.synthetic import Conditions, _make_scene

    conditions = Conditions(**options)
    rng, sub = np.random.default_rng([11, 0]), np.random.default_rng([11, 3])
    return _make_scene(rng, 96, 96, conditions, sub)


def _green_by_day(scene, days: range) -> np.ndarray:
    """[days, parcels] green fraction per parcel (its first pixel), day by day of 2023."""
    from datetime import date, timedelta

    from pivotmap.tasks.synthetic import _green_fraction

    first = np.unique(scene.parcels, return_index=True)[1]
    start = date(2023, 1, 1)
    return np.stack([_green_fraction(scene, start + timedelta(d - 1)).ravel()[first] for d in days])


def test_default_conditions_keep_the_demo_scene() -> None:
    plain, explicit = _scene(), _scene(phenology_shift_days=0, drought=0.0)
    assert np.array_equal(plain.truth, explicit.truth) and not plain.subtype.any()
    assert np.array_equal(_green_by_day(plain, range(1, 366, 30)),
                          _green_by_day(explicit, range(1, 366, 30)))  # fmt: skip


@pytest.mark.parametrize("shift", [-25, 30])
def test_phenology_shift_moves_the_green_up_of_every_crop_parcel(shift: int) -> None:
    base, moved = _scene(), _scene(phenology_shift_days=shift)
    days = range(1, 366)
    crops = np.isin(base.truth, (CEREALS, MAIZE))
    assert crops.sum() >= 5
    a, b = _green_by_day(base, days)[:, crops], _green_by_day(moved, days)[:, crops]
    # the first day each crop parcel passes half its peak green cover, after the winter
    spring = slice(40, 365)
    up_a = np.argmax(a[spring] > 0.5 * a.max(0), axis=0)
    up_b = np.argmax(b[spring] > 0.5 * b.max(0), axis=0)
    assert np.all(np.abs(up_b - up_a - shift) <= 1), up_b - up_a


def test_phenology_stretch_lengthens_the_season() -> None:
    base, long = _scene(parcel_jitter_days=0), _scene(phenology_stretch=1.3, parcel_jitter_days=0)
    maize = base.truth == MAIZE
    green_days = [(_green_by_day(s, range(1, 366))[:, maize] > 0.5).sum(0) for s in (base, long)]
    ratio = green_days[1] / green_days[0]
    assert np.all((ratio > 1.2) & (ratio < 1.4)), ratio


def test_drought_lowers_the_summer_peak_of_crops_and_grass_only() -> None:
    base, dry = _scene(), _scene(drought=1.0)
    summer, winter = range(180, 230, 5), range(1, 60, 5)
    for code, lowered in ((MAIZE, True), (3, True), (BUILT_UP, False)):
        sel = base.truth == code
        peak_a = _green_by_day(base, summer)[:, sel].max(0)
        peak_b = _green_by_day(dry, summer)[:, sel].max(0)
        if lowered:
            assert np.all(peak_b < 0.7 * peak_a), code
        else:
            assert np.allclose(peak_a, peak_b), code
    assert np.allclose(_green_by_day(base, winter), _green_by_day(dry, winter), atol=0.02)


def test_subtypes_and_class_weights_change_the_mix() -> None:
    mixed = _scene(subtype_shares={CEREALS: 0.7, 3: 0.5}.items())
    cereals = mixed.truth == CEREALS
    assert 0.4 < mixed.subtype[cereals].mean() <= 1 and not mixed.subtype[mixed.truth == 4].any()
    # spring cereals are bare in March when winter cereals are green
    march = _green_by_day(mixed, range(70, 80))[:, cereals].mean(0)
    assert march[mixed.subtype[cereals]].max() < march[~mixed.subtype[cereals]].min()
    # a pasture is never mown: no sudden dip in its green cover
    pasture = (mixed.truth == 3) & mixed.subtype
    assert pasture.any() and np.all(mixed.cuts[pasture] > 1e5)
    waterlogged = _scene(class_weights=(0, 0, 0, 0, 0, 1))
    assert np.mean(waterlogged.truth == WATER) > 0.85  # one of each class, then water


def test_bad_conditions_are_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drought"):
        generate_demo_region(tmp_path / "x", drought=1.5)
    with pytest.raises(ValueError, match="class_weights"):
        generate_demo_region(tmp_path / "x", class_weights=(1, 2))
    with pytest.raises(ValueError, match="subtype_shares"):
        generate_demo_region(tmp_path / "x", subtype_shares={WATER: 0.5})


def test_cloud_regime_orbits_and_shift_reach_the_files(tmp_path: Path) -> None:
    """Region B: overcast half the time, one descending S1 track, the season 30 days later:
    the S2 NDVI of clear maize pixels rises 30 days later than in region A."""
    from datetime import time

    from pivotmap.tasks.synthetic import S1Track

    period = {"tiles_x": 1, "tiles_y": 1, "tile_size": 32, "start": "2023-06-20"}
    a = generate_demo_region(tmp_path / "a", seed=4, end="2023-08-25", clear_probability=1.0,
                             overcast_probability=0.0, **period)  # fmt: skip
    b = generate_demo_region(
        tmp_path / "b", seed=4, end="2023-08-25", clear_probability=0.0, overcast_probability=0.5,
        phenology_shift_days=30, s1_tracks=[S1Track(110, time(5, 50, 0), -1.0, "descending")],
        **period,
    )  # fmt: skip
    clear = [i.properties["eo:cloud_cover"] == 0 for i in _items(a, "sentinel-2-l2a")]
    assert np.mean(clear) > 0.75  # no cloud; a veil of cirrus on a few dates
    covers = [i.properties["eo:cloud_cover"] for i in _items(b, "sentinel-2-l2a")]
    assert sum(c > 90 for c in covers) >= 4 and sum(c == 0 for c in covers) < len(covers) / 2
    orbits = {(_on_disk(i)["properties"]["sat:orbit_state"], _on_disk(i)["properties"][
        "sat:relative_orbit"]) for i in _items(b, "sentinel-1-rtc")}  # fmt: skip
    assert orbits == {("descending", 110)}
    readme = (b.catalog_path.parent / "README.md").read_text()
    readme_a = (a.catalog_path.parent / "README.md").read_text()
    assert "`phenology_shift_days`: 30.0" in readme and "`clear_probability`: 1.0" in readme_a
    assert "phenology_shift_days" not in readme_a  # only what differs from the demo is named
    labels = _read(a.labels_path)[::2, ::2]
    maize = labels == MAIZE
    assert maize.sum() > 5

    def rise_day(region: DemoRegion) -> int | None:
        for item in _items(region, "sentinel-2-l2a"):
            scl = _band(item, "scl")
            red, nir = (_to_20m(_band(item, k)) for k in ("red", "nir"))
            clear = maize & np.isin(scl, CLEAR)
            if clear.sum() > 3 and np.median(((nir - red) / (nir + red))[clear]) > 0.5:
                assert item.datetime is not None
                return item.datetime.timetuple().tm_yday
        return None

    day_a, day_b = rise_day(a), rise_day(b)
    assert day_a is not None and day_b is not None and 20 <= day_b - day_a <= 40
