"""Published STAC read by outside tools: odc-stac, stac-check and stac-validator (offline)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import jsonschema
import numpy as np
import odc.stac
import pystac
import pytest
import rasterio
import referencing
from stac_check.lint import Linter
from stac_validator import utilities as stac_validator_utils
from stac_validator.validate import StacValidate

from pivotmap.tasks import concept_products, publish, stac_products
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.nomenclature import NODATA_CODE, LandCoverClass, Nomenclature
from pivotmap.tasks.publish import Provenance, TileMap, publish_products

GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=32, origin_x=500000, origin_y=5630000)
BASE_URL = "https://maps.example.org/landcover"
PROVIDERS = [{"name": "Test agency", "roles": ["producer", "licensor", "host"]}]
PYSTAC_SCHEMAS = Path(pystac.__file__).parent / "validation" / "jsonschemas"
CORE_URL = "https://schemas.stacspec.org/v1.1.0"
MODEL_CARD = {
    "mlm:name": "pivotmap-demo",
    "mlm:architecture": "temporal encoders with fusion",
    "mlm:tasks": ["classification"],
    "mlm:framework": "PyTorch",
    "mlm:total_parameters": 1234,
    "mlm:input": [{
        "name": "pixel time series", "bands": [],
        "input": {"shape": [-1, -1, -1], "dim_order": ["batch", "time", "channel"],
                  "data_type": "float32"},
    }],
    "mlm:output": [{
        "name": "class", "tasks": ["classification"],
        "result": {"shape": [-1, 3], "dim_order": ["batch", "class"], "data_type": "float32"},
    }],
}  # fmt: skip


def _nomenclature() -> Nomenclature:
    classes = [
        LandCoverClass(code=1, name="Tree cover", color="#006400", description="Trees."),
        LandCoverClass(code=2, name="Cropland", color="#F096FF", description="Crops."),
        LandCoverClass(code=3, name="Water", color="#0064C8", description="Water."),
    ]
    return Nomenclature(name="Test LC", classes=classes)


def _maps() -> list[TileMap]:
    rng = np.random.default_rng(1)
    maps = []
    for ix in (0, 1):
        tile = GRID.tile(ix, 0)
        classes = rng.integers(1, 4, (32, 32)).astype(np.uint8)
        classes[:5, :3] = NODATA_CODE
        confidence = rng.integers(0, 101, (32, 32)).astype(np.uint8)
        confidence[classes == NODATA_CODE] = NODATA_CODE
        maps.append(TileMap(tile.id, tile.geobox, classes, confidence))
    return maps


def _concept_layers(run: Path, maps: list[TileMap]) -> dict[str, list]:
    """A concept map per tile, written in the run folder (a local path, as a real run does)."""
    layers = {}
    model = {"name": "pivotmap-demo", "version": "7"}
    for m in maps:
        path = run / "concepts" / f"{m.tile_id}_lake.tif"
        concept_products.write_layer_cog(
            path, m.confidence, m.geobox, descriptions=["probability"], tags={}
        )
        concept = concept_products.concept_layer(str(path), "a lake", "raw", model)
        coarse = m.geobox.zoom_out(4)  # explanations are coarser than the tile
        path = run / "explain" / f"{m.tile_id}_explanation.tif"
        bands = np.stack([m.classes[::4, ::4], m.confidence[::4, ::4] % 12])
        concept_products.write_layer_cog(
            path, bands, coarse, descriptions=["variable", "window"], tags={}
        )
        explanation = concept_products.explanation_layer(
            str(path), "ig", ["B04", "VV"], ["2024-01"], 4, model
        )
        layers[m.tile_id] = [concept, explanation]
    return layers


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def published(run_folder) -> tuple[Path, list[TileMap]]:
    """A demo-like publish: local cube path, local layer files, concept layers, mosaic COG."""
    maps = _maps()
    provenance = Provenance(
        model_name="pivotmap-demo", model_version="7", model_run_id="0123abcd",
        model_uri="models:/pivotmap-demo/7", cube_url=str(run_folder / "cube" / "pivot.zarr"),
        cube_version="2024.1", period_start="2024-01-01", period_end="2024-12-31",
        source_item_count=42, source_collections=("sentinel-2-l2a",), software_version="0.1.0",
        config_hash="c0ffee", model_card=MODEL_CARD,
    )  # fmt: skip
    out = run_folder / "products"
    publish_products(
        maps, _nomenclature(), provenance, out, version="v1", collection_id="pivotmap-test",
        title="Test land cover", providers=PROVIDERS, base_url=BASE_URL, mosaic_cog=True,
        layers=_concept_layers(run_folder, maps),
    )  # fmt: skip
    return out, maps


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails: the tools must work from local schemas only."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _schema_map(schema_dir: Path) -> dict[str, str]:
    """Schema URL -> local file: extensions from shared/stac-schemas, STAC 1.1.0 core from pystac."""
    index = json.loads((schema_dir / "index.json").read_text(encoding="utf-8"))
    mapping = {url: str(schema_dir / rel) for url, rel in index.items()}
    for path in (PYSTAC_SCHEMAS / "stac-spec" / "v1.1.0").glob("*.json"):
        spec = {"catalog": "catalog-spec", "collection": "collection-spec"}.get(path.stem)
        mapping[f"{CORE_URL}/{spec or 'item-spec'}/json-schema/{path.name}"] = str(path)
    return mapping


@pytest.fixture
def local_schemas(schema_dir, monkeypatch, no_network) -> dict[str, str]:
    """stac-validator (also inside stac-check) loads schemas from local files only."""
    mapping = _schema_map(schema_dir)

    def load(path: str) -> dict:
        path = mapping.get(path, path)
        if stac_validator_utils.is_url(path):
            raise OSError(f"no local copy of schema {path}")
        return json.loads(Path(path).read_text(encoding="utf-8"))

    monkeypatch.setattr(stac_validator_utils, "_schema_cache", load)
    return mapping


def _stac_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.json") if p.name != "class_areas.json")


def _items(out: Path) -> list[pystac.Item]:
    (collection,) = pystac.Catalog.from_file(str(out / "catalog.json")).get_children()
    return sorted(collection.get_items(), key=lambda i: i.id)


def test_odc_stac_loads_bands_with_their_type_nodata_and_values(published):
    out, maps = published
    for item, tile in zip(_items(out), maps, strict=True):
        for band in ("class", "confidence", "concept-a-lake", "explanation"):
            ds = odc.stac.load([item], bands=[band])  # each on its own grid
            assert ds[band].dtype == np.uint8, band
            assert ds[band].attrs["nodata"] == NODATA_CODE, band
            with rasterio.open(item.assets[band].get_absolute_href()) as src:
                assert np.array_equal(ds[band].values[0], src.read(1)), band
            if band == "class":
                assert np.array_equal(ds[band].values[0], tile.classes)


def test_class_bands_carry_the_legend(published):
    out, _ = published
    for item in _items(out):
        (band,) = item.assets["class"].extra_fields["bands"]
        codes = [c["value"] for c in band["classification:classes"]]
        assert codes == [1, 2, 3, NODATA_CODE] and band["nodata"] == NODATA_CODE
    collection = json.loads((out / "v1" / "collection.json").read_text(encoding="utf-8"))
    for key in ("mosaic", "mosaic_cog"):
        assert collection["assets"][key]["bands"][0]["data_type"] == "uint8"


def test_no_local_path_in_any_published_file(published, run_folder):
    out, _ = published
    leaks = [str(run_folder), str(Path.home()), "/tmp/", "file://"]
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found = [leak for leak in leaks if leak.encode() in data]
        assert not found, f"{path.relative_to(out)} holds {found}"
    collection = json.loads((out / "v1" / "collection.json").read_text(encoding="utf-8"))
    assert collection["pivotmap:cube_url"] == "pivot.zarr"
    item_path = next(p for p in _stac_files(out) if p.parent.name.startswith("E"))
    item = json.loads(item_path.read_text(encoding="utf-8"))
    assert "pivot.zarr version 2024.1" in item["properties"]["processing:lineage"]


def test_stac_check_has_no_findings(published, local_schemas):
    out, _ = published
    files = _stac_files(out)
    assert len(files) == 1 + 1 + 2
    for path in files:
        linter = Linter(str(path))
        assert linter.valid_stac, (path.name, linter.error_msg)
        assert linter.create_best_practices_dict() == {}, path.name


def test_stac_validator_accepts_the_catalogue_offline(published, local_schemas):
    out, _ = published
    validator = StacValidate(str(out / "catalog.json"), recursive=True, schema_map=local_schemas)
    assert validator.run(), validator.message
    assert len(validator.message) == 1 + 1 + 2
    schemas = {s for m in validator.message for s in m.get("schema", [])}
    assert any(s.endswith("mlm/v1.4.0/schema.json") for s in schemas)  # collection vs MLM


def test_offline_validation_rejects_a_wrong_band(published, local_schemas):
    out, _ = published
    item_path = next(p for p in _stac_files(out) if p.parent.name.startswith("E"))
    doc = json.loads(item_path.read_text(encoding="utf-8"))
    doc["assets"]["class"]["bands"][0]["data_type"] = "byte"  # not a STAC data type
    validator = StacValidate(schema_map=local_schemas)
    assert not validator.validate_dict(doc)


def test_collection_describes_model_summaries_item_assets_and_providers(published, schema_dir):
    out, _ = published
    collection = json.loads((out / "v1" / "collection.json").read_text(encoding="utf-8"))
    roles = {role for p in collection["providers"] for role in p["roles"]}
    assert {"producer", "licensor", "host", "processor"} <= roles
    assert {"class", "confidence", "concept-a-lake"} <= set(collection["item_assets"])
    assert "count" not in json.dumps(collection["item_assets"])  # templates, not tile data
    assert collection["summaries"]["proj:code"] == {"type": "string", "enum": ["EPSG:32631"]}
    assert collection["assets"]["model"]["roles"] == ["mlm:model"]
    fields = {k: v for k, v in collection.items() if k.startswith("mlm:")}
    assert fields["mlm:name"] == "pivotmap-demo" and fields["mlm:total_parameters"] == 1234
    # MLM v1.4.0 validates Collection summaries/assets only; check the top-level model fields
    # against the schema's Item-level definition, which requires name, tasks, input, output.
    schemas = {u: json.loads(Path(p).read_text()) for u, p in _schema_map(schema_dir).items()}
    registry = referencing.Registry().with_resources(
        (url, referencing.jsonschema.DRAFT7.create_resource(s)) for url, s in schemas.items()
    )
    ref = {"$ref": f"{stac_products.MLM_SCHEMA}#/$defs/mlmItemFields"}
    jsonschema.Draft7Validator(ref, registry=registry).validate(fields)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(ref, registry=registry).validate({"mlm:name": "x"})


def test_self_links_are_public_urls_and_survive_rollback_and_relocation(published, tmp_path):
    out, maps = published
    catalog = json.loads((out / "catalog.json").read_text(encoding="utf-8"))
    collection = json.loads((out / "v1" / "collection.json").read_text(encoding="utf-8"))
    self_of = {name: next(lk["href"] for lk in doc["links"] if lk["rel"] == "self")
               for name, doc in (("catalog", catalog), ("collection", collection))}  # fmt: skip
    assert self_of == {
        "catalog": f"{BASE_URL}/catalog.json", "collection": f"{BASE_URL}/v1/collection.json"
    }  # fmt: skip
    publish.write_root_catalog(out, "v1", collection["id"], collection["title"])  # rollback
    assert json.loads((out / "catalog.json").read_text(encoding="utf-8")) == catalog
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for item in _items(moved):  # links stay relative: the copy reads from where it lies
        href = Path(item.assets["class"].get_absolute_href())
        assert href.is_relative_to(moved) and href.is_file()
    assert sorted(i.id for i in _items(moved)) == sorted(m.tile_id.lower() for m in maps)
