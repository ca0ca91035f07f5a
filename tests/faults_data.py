"""Small inputs for the faults suite: a tiny seeded synthetic region, its run config, and helpers
that damage a copy of it (corrupt or truncated COGs, missing assets, CRS, SCL, labels, colours)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

TILE = 32  # px; the tiny region is TILES_X x TILES_Y tiles of TILE x TILE at 10 m
TILES_X, TILES_Y = 2, 1
START, END = "2023-04-01", "2023-07-31"  # 25 S2 and 21 S1 dates
ORIGIN = (500000.0, 5630000.0)


def make_region(
    folder: Path, *, tiles_x: int = TILES_X, tiles_y: int = TILES_Y, dates=(START, END)
) -> Path:
    """Generate the tiny region's static catalogue under `folder`; returns catalog.json."""
    from pivotmap.tasks.synthetic import generate_demo_region

    region = generate_demo_region(
        folder, seed=7, tiles_x=tiles_x, tiles_y=tiles_y, tile_size=TILE, start=dates[0],
        end=dates[1],
    )  # fmt: skip
    return region.catalog_path


def config_dict(
    data: Path, *, tiles_x: int = TILES_X, tiles_y: int = TILES_Y, dates=(START, END), **sections
) -> dict:
    """A run config over the region in `data` (a folder from `make_region`), cheap to train."""
    x0, y0 = ORIGIN
    raw = {
        "name": "faults",
        "source": {"kind": "static", "url": str(data / "catalog.json"),
                   "s2_collection": "sentinel-2-l2a", "s1_collection": "sentinel-1-rtc"},
        "grid": {"crs": "EPSG:32631", "resolution": 10, "tile_size": TILE,
                 "origin_x": x0, "origin_y": y0},
        "region": {"bbox": [x0, y0, x0 + tiles_x * TILE * 10, y0 + tiles_y * TILE * 10],
                   "crs": "EPSG:32631"},
        "period": {"start": dates[0], "end": dates[1]},
        "labels": {"url": str(data / "labels" / "lc.tif"),
                   "nomenclature": str(data / "labels" / "nomenclature.yaml")},
        "ingest": {"workers": 2},
        "train": {"epochs": 2, "max_train_pixels": 600, "block_size": 8, "pretrain_epochs": 0,
                  "baseline_trees": 0, "distill_epochs": 0, "cpu_threads": 1, "step_days": 10},
        "predict": {"dask": "none", "window": 16},
        "publish": {"validate_stac": "off"},
    }  # fmt: skip
    from pivotmap.config import RunConfig

    for optional in ("concept", "explain"):  # extras this suite does not test: off, for speed
        if optional in RunConfig.model_fields:
            raw[optional] = {"enabled": False}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_region(src: Path, dst: Path) -> Path:
    """A private copy of a generated region that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def digests(folder: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under `folder` matching `pattern`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
        if p.is_file()
    }


def product_digests(out: Path) -> dict[str, str]:
    """The published products of a run folder (COGs, VRT, PNG, STAC) by path under products/."""
    return digests(out / "products")


def cog_digests(out: Path) -> dict[str, str]:
    return digests(out / "products", "*.tif")


# ---------------------------------------------------------------------------- damage


def s2_items(data: Path) -> list[Path]:
    return items_of(data, "sentinel-2-l2a")


def items_of(data: Path, collection: str) -> list[Path]:
    """The item JSON files of a collection (each in a folder of its id), in date order."""
    return sorted(p for p in (data / collection).rglob("*.json") if p.stem == p.parent.name)


def item_doc(path: Path) -> dict:
    return json.loads(path.read_text())


def asset_path(item_json: Path, key: str) -> Path:
    href = item_doc(item_json)["assets"][key]["href"]
    return (item_json.parent / href).resolve()


def edit_item(item_json: Path, edit) -> str:
    """Apply `edit(doc)` to an item's JSON in place; returns the item id."""
    doc = item_doc(item_json)
    edit(doc)
    item_json.write_text(json.dumps(doc))
    return doc["id"]


def corrupt_cog(path: Path) -> None:
    """Keep the TIFF magic, garble the rest: GDAL must refuse it, not read noise."""
    size = path.stat().st_size
    path.write_bytes(b"II*\x00" + bytes((i * 37) % 251 for i in range(size - 4)))


def truncate_cog(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def strip_crs(path: Path) -> None:
    """Rewrite a GeoTIFF without any CRS (same pixels and transform)."""
    import rasterio

    with rasterio.open(path) as src:
        profile, data = src.profile, src.read()
    profile.pop("crs", None)
    tmp = path.with_suffix(".nocrs.tif")
    with rasterio.open(tmp, "w", **{**profile, "crs": None}) as dst:
        dst.write(data)
    tmp.replace(path)


def set_crs(path: Path, crs: str) -> None:
    """Declare another CRS in the file, keeping the numbers of the transform (a wrong CRS)."""
    import rasterio

    with rasterio.open(path, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.crs = crs


def cloud_cover(scl: Path, x_from: float) -> None:
    """Mark an SCL COG cloudy (class 9) east of `x_from` (CRS units)."""
    import rasterio

    with rasterio.open(scl, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        data = dst.read(1)
        col = max(0, int(round((x_from - dst.transform.c) / dst.transform.a)))
        data[:, col:] = 9
        dst.write(data, 1)


TOKEN_ENV = "PIVOTMAP_FAULTS_TOKEN"


def sign_hrefs(item):
    """An href modifier like `planetary_computer:sign_inplace`: appends a token read from the
    environment to every asset href (the token must never reach a log, report or product)."""
    import os

    token = os.environ[TOKEN_ENV]
    for asset in item.assets.values():
        asset.href = f"{asset.href}?sig={token}"
    return item


def publish_inputs():
    """The nomenclature and provenance of tests/test_publish.py's two-tile maps."""
    from pivotmap.tasks.nomenclature import LandCoverClass, Nomenclature
    from pivotmap.tasks.publish import Provenance

    classes = [
        LandCoverClass(code=1, name="Tree cover", color="#006400", description="Trees over 5 m."),
        LandCoverClass(code=2, name="Cropland", color="#F096FF", description="Annual crops."),
        LandCoverClass(code=3, name="Water", color="#0064C8", description="Open water."),
    ]
    provenance = Provenance(
        model_name="pivotmap-faults", model_version="1", model_run_id="0123abcd",
        model_uri="models:/pivotmap-faults/1", cube_url="file:///data/cube.zarr",
        cube_version="2024.1", period_start="2024-01-01", period_end="2024-12-31",
        source_item_count=4, source_collections=("sentinel-2-l2a",), software_version="0.1.0",
        config_hash="c0ffee",
    )  # fmt: skip
    return Nomenclature(name="Test LC", classes=classes), provenance
