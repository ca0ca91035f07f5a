"""Tests for the local publishing stage: COGs, VRT, quicklook, class areas, STAC and atomicity."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rio_cogeo import cog_validate

from pivotmap.tasks import cog, stac_products
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.nomenclature import NODATA_CODE, LandCoverClass, Nomenclature
from pivotmap.tasks.publish import Provenance, PublishError, TileMap, publish_products

GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=32, origin_x=500000, origin_y=5630000)
PUBLISH_ARGS = {"collection_id": "pivotmap-test", "title": "Test land cover"}


@pytest.fixture(scope="module")
def nomenclature() -> Nomenclature:
    classes = [
        LandCoverClass(code=1, name="Tree cover", color="#006400", description="Trees over 5 m."),
        LandCoverClass(code=2, name="Cropland", color="#F096FF", description="Annual crops."),
        LandCoverClass(code=3, name="Water", color="#0064C8", description="Open water."),
    ]
    return Nomenclature(name="Test LC", classes=classes)


def make_maps(seed: int = 0) -> list[TileMap]:
    """Two adjacent 32x32 tiles with random classes and a nodata corner each."""
    rng = np.random.default_rng(seed)
    maps = []
    for ix in (0, 1):
        tile = GRID.tile(ix, 0)
        classes = rng.integers(1, 4, (32, 32)).astype(np.uint8)
        classes[:4, :4] = NODATA_CODE
        confidence = rng.integers(0, 101, (32, 32)).astype(np.uint8)
        confidence[classes == NODATA_CODE] = NODATA_CODE
        maps.append(TileMap(tile.id, tile.geobox, classes, confidence))
    return maps


@pytest.fixture(scope="module")
def provenance() -> Provenance:
    return Provenance(
        model_name="pivotmap-demo",
        model_version="7",
        model_run_id="0123abcd",
        model_uri="models:/pivotmap-demo/7",
        cube_url="file:///data/cube.zarr",
        cube_version="2024.1",
        period_start="2024-01-01",
        period_end="2024-12-31",
        source_item_count=42,
        source_collections=("sentinel-2-l2a", "sentinel-1-grd"),
        software_version="0.1.0",
        config_hash="c0ffee",
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory, nomenclature, provenance) -> tuple[Path, dict, list[TileMap]]:
    out = tmp_path_factory.mktemp("published")
    maps = make_maps()
    summary = publish_products(maps, nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    return out, summary, maps


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_summary_reports_the_run(published):
    out, summary, maps = published
    assert summary["version"] == "v1" and summary["tiles_published"] == 2
    assert summary["already_published"] is False
    # per tile: 2 COGs, the class COG's .aux.xml (category names) and the item;
    # run: vrt, png, json, collection
    assert summary["files"] == 2 * 4 + 4
    assert summary["bytes"] == sum(p.stat().st_size for p in (out / "v1").rglob("*") if p.is_file())
    assert Path(summary["collection"]) == out / "v1" / "collection.json"


def test_class_cogs_are_valid_paletted_and_exact(published, nomenclature):
    out, _, maps = published
    for tile in maps:
        path = out / "v1" / tile.tile_id / f"{tile.tile_id}_class.tif"
        is_valid, errors, _ = cog_validate(str(path), quiet=True)
        assert is_valid and not errors
        with rasterio.open(path) as src:
            assert src.dtypes[0] == "uint8" and src.nodata == NODATA_CODE
            assert src.crs.to_epsg() == 32631 and src.transform == tile.geobox.affine
            table = src.colormap(1)
            assert {
                code: table[code] for code in nomenclature.colormap()
            } == nomenclature.colormap()
            np.testing.assert_array_equal(src.read(1), tile.classes)


def test_confidence_cogs_are_valid_and_exact(published):
    out, _, maps = published
    for tile in maps:
        path = out / "v1" / tile.tile_id / f"{tile.tile_id}_confidence.tif"
        assert cog_validate(str(path), quiet=True)[0]
        with rasterio.open(path) as src:
            assert src.nodata == NODATA_CODE
            np.testing.assert_array_equal(src.read(1), tile.confidence)


def test_large_class_cog_has_overviews_that_keep_codes(tmp_path, nomenclature):
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=1024, origin_x=500000, origin_y=5630000
    )
    tile = grid.tile(0, 0)
    classes = np.random.default_rng(1).choice([1, 2, 3, 255], (1024, 1024)).astype(np.uint8)
    path = cog.write_class_cog(tmp_path / "big.tif", classes, tile.geobox, nomenclature.colormap())
    assert cog_validate(str(path), quiet=True)[0]
    with rasterio.open(path) as src:
        assert src.overviews(1) and src.block_shapes[0] == (512, 512)
        overview = src.read(1, out_shape=(256, 256))
    # Nearest resampling never invents codes (averaging 1 and 3 would give 2 or 255 blends).
    assert set(np.unique(overview).tolist()) <= {1, 2, 3, 255}
    assert not list(tmp_path.glob("*.aux.xml"))


def test_vrt_reads_back_the_mosaic(published, nomenclature):
    out, _, maps = published
    with rasterio.open(out / "v1" / "mosaic_class.vrt") as src:
        assert src.shape == (32, 64) and src.nodata == NODATA_CODE and src.crs.to_epsg() == 32631
        assert src.transform == maps[0].geobox.affine
        assert src.colormap(1)[2] == nomenclature.colormap()[2]
        mosaic = src.read(1)
    np.testing.assert_array_equal(mosaic[:, :32], maps[0].classes)
    np.testing.assert_array_equal(mosaic[:, 32:], maps[1].classes)


def test_class_areas_count_every_pixel(published):
    out, summary, maps = published
    table = json.loads((out / "v1" / "class_areas.json").read_text())
    assert table == summary["class_areas"]
    for row in table["classes"]:
        pixels = sum(int((m.classes == row["code"]).sum()) for m in maps)
        assert row["pixels"] == pixels
        assert row["area_km2"] == pytest.approx(pixels * 100 / 1e6)
    assert table["nodata_pixels"] == 2 * 16


def test_quicklook_is_a_png(published):
    out, _, _ = published
    assert (out / "v1" / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publishing_twice_is_byte_identical(tmp_path, published, nomenclature, provenance):
    first, _, _ = published
    second = tmp_path / "again"
    publish_products(make_maps(), nomenclature, provenance, second, version="v1", **PUBLISH_ARGS)
    assert tree_digests(first / "v1") == tree_digests(second / "v1")
    assert sha256(first / "catalog.json") == sha256(second / "catalog.json")


def test_republishing_the_same_version_is_a_noop(tmp_path, nomenclature, provenance):
    out = tmp_path / "out"
    publish_products(make_maps(), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = publish_products(
        make_maps(), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS
    )
    assert summary["already_published"] is True
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "v1"]


def test_same_version_with_other_content_is_refused(tmp_path, nomenclature, provenance):
    out = tmp_path / "out"
    publish_products(make_maps(), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    digests = tree_digests(out)
    with pytest.raises(PublishError, match=r"v1 already exists with different content"):
        publish_products(
            make_maps(seed=9), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS
        )
    assert tree_digests(out) == digests
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "v1"]


def test_catalog_switches_to_the_new_version(tmp_path, nomenclature, provenance):
    out = tmp_path / "out"
    publish_products(make_maps(), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    publish_products(make_maps(seed=5), nomenclature, provenance, out, version="v2", **PUBLISH_ARGS)
    (child,) = pystac.Catalog.from_file(str(out / "catalog.json")).get_children()
    assert Path(child.get_self_href()) == out / "v2" / "collection.json"
    assert (out / "v1" / "collection.json").is_file()  # earlier versions stay readable


def test_catalog_walks_to_assets_with_matching_checksums(published):
    out, _, maps = published
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    (collection,) = catalog.get_children()
    assert isinstance(collection, pystac.Collection) and collection.id == "pivotmap-test"
    assert collection.license and collection.providers
    assert set(collection.assets) == {"mosaic", "quicklook", "class_areas", "model"}
    assert collection.assets["quicklook"].roles == ["overview"]
    assert collection.assets["model"].href == "models:/pivotmap-demo/7"  # a registry URI
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == sorted(m.tile_id.lower() for m in maps)
    for owner in [collection, *items]:
        for key, asset in owner.assets.items():
            if key == "model":
                continue
            path = Path(asset.get_absolute_href())
            assert path.is_file()
            assert asset.extra_fields["file:size"] == path.stat().st_size
            assert asset.extra_fields["file:checksum"] == "1220" + sha256(path)


def test_items_carry_projection_classification_and_provenance(published, nomenclature):
    out, _, maps = published
    item = pystac.Item.from_file(
        str(out / "v1" / maps[0].tile_id / f"{maps[0].tile_id.lower()}.json")
    )
    props = item.properties
    assert props["proj:code"] == "EPSG:32631" and props["proj:shape"] == [32, 32]
    assert props["proj:transform"] == list(maps[0].geobox.affine)[:6]
    assert props["start_datetime"].startswith("2024-01-01")
    assert props["datetime"] == props["start_datetime"]  # a nominal time, never null
    assert props["processing:software"] == {"pivotmap": "0.1.0"}
    assert "pivotmap-demo" in props["processing:lineage"]
    assert props["pivotmap:model_version"] == "7" and props["pivotmap:model_run_id"] == "0123abcd"
    assert props["pivotmap:cube_version"] == "2024.1" and props["pivotmap:config_hash"] == "c0ffee"
    west, south, east, north = item.bbox
    assert 2.9 < west < east < 3.1 and 50.7 < south < north < 50.9
    classes = item.assets["class"].extra_fields["classification:classes"]
    by_value = {c["value"]: c for c in classes}
    for cls in nomenclature.classes:
        assert by_value[cls.code]["color_hint"] == cls.color[1:].upper()
        assert by_value[cls.code]["title"] == cls.name
        assert by_value[cls.code]["count"] == int((maps[0].classes == cls.code).sum())
    assert by_value[NODATA_CODE]["nodata"] is True
    assert item.assets["confidence"].roles == ["data", "metadata"]


def test_validate_offline_accepts_published_stac_without_network(
    published, monkeypatch, schema_dir
):
    out, _, _ = published

    def no_network(*args, **kwargs):
        raise AssertionError("validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    assert stac_products.validate_offline(catalog, schema_dir) == 1 + 1 + 2


def test_validate_offline_rejects_a_bad_classification(published, schema_dir):
    out, _, maps = published
    item = pystac.Item.from_file(
        str(out / "v1" / maps[0].tile_id / f"{maps[0].tile_id.lower()}.json")
    )
    item.assets["class"].extra_fields["classification:classes"][0]["color_hint"] = "#006400"
    with pytest.raises(pystac.errors.STACValidationError, match="classification"):
        stac_products.validate_offline(item, schema_dir)


def test_validate_offline_refuses_unknown_schemas(published, schema_dir):
    out, _, maps = published
    item = pystac.Item.from_file(
        str(out / "v1" / maps[0].tile_id / f"{maps[0].tile_id.lower()}.json")
    )
    item.stac_extensions.append("https://stac-extensions.github.io/eo/v0.9.0/schema.json")
    with pytest.raises(stac_products.OfflineSchemaError, match="eo/v0.9.0"):
        stac_products.validate_offline(item, schema_dir)


def test_invalid_stac_is_never_published(
    tmp_path, monkeypatch, nomenclature, provenance, schema_dir
):
    out = tmp_path / "out"

    def bad_classes(*args, **kwargs):
        return [{"value": 1, "name": "has spaces"}]

    monkeypatch.setattr(stac_products, "classification_classes", bad_classes)
    with pytest.raises(PublishError, match="invalid; nothing published"):
        publish_products(
            make_maps(),
            nomenclature,
            provenance,
            out,
            version="v1",
            schema_dir=schema_dir,
            **PUBLISH_ARGS,
        )
    assert list(out.iterdir()) == []


def test_failure_while_staging_keeps_the_previous_version(
    tmp_path, monkeypatch, nomenclature, provenance
):
    out = tmp_path / "out"
    publish_products(make_maps(), nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    catalog_bytes = (out / "catalog.json").read_bytes()
    real_writer, calls = cog.write_confidence_cog, []

    def failing_writer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(cog, "write_confidence_cog", failing_writer)
    with pytest.raises(OSError, match="injected"):
        publish_products(
            make_maps(seed=3), nomenclature, provenance, out, version="v2", **PUBLISH_ARGS
        )
    assert (out / "catalog.json").read_bytes() == catalog_bytes
    assert sorted(p.name for p in out.iterdir()) == ["catalog.json", "v1"]


def test_unknown_class_codes_are_refused(tmp_path, nomenclature, provenance):
    maps = make_maps()
    maps[0].classes[0, 0] = 9
    with pytest.raises(PublishError, match=r"codes \[9\]"):
        publish_products(maps, nomenclature, provenance, tmp_path, version="v1", **PUBLISH_ARGS)


def test_bad_inputs_name_the_problem(tmp_path, nomenclature, provenance):
    tile = GRID.tile(0, 0)
    ok = np.ones((32, 32), np.uint8)
    with pytest.raises(PublishError, match="confidence must be uint8"):
        TileMap(tile.id, tile.geobox, ok, np.ones((16, 16), np.uint8))
    with pytest.raises(PublishError, match="above 100"):
        TileMap(tile.id, tile.geobox, ok, np.full((32, 32), 101, np.uint8))
    with pytest.raises(PublishError, match="version"):
        publish_products(
            make_maps(), nomenclature, provenance, tmp_path, version="../x", **PUBLISH_ARGS
        )
