"""Reference data per tile: vector files and rasters in other CRSs, rasterised tile by tile
exactly as over the whole extent, with erosion, years, weights, split groups and checks."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.features
import yaml
from odc.geo.geobox import GeoBox
from shapely.geometry import Point, box

from pivotmap.config import ConfigError, LabelsConfig, LabelSource, load_run_config
from pivotmap.flows.demo import demo_config_dict
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.labels import (
    NO_GROUP,
    UNKNOWN,
    LabelError,
    check_labels,
    labels_fingerprint,
    read_labels,
    read_tile_labels,
    source_kind,
)
from pivotmap.tasks.nomenclature import NomenclatureError, load_nomenclature

GRID = GridSpec(crs="EPSG:32631", resolution=10, tile_size=32, origin_x=500000, origin_y=5630000)
TILES = [GRID.tile(ix, iy) for iy in (1, 0) for ix in (0, 1)]  # 2 x 2 tiles of 320 m
EXTENT = GRID.union_geobox(TILES)
X0, Y0 = 500000, 5630000
FORMATS = {"gpkg": "GPKG", "parquet": None, "fgb": "FlatGeobuf", "geojson": "GeoJSON"}


# ---------------------------------------------------------------------------- fixtures
def reference_features() -> gpd.GeoDataFrame:
    """Polygons on pixel edges (one across the tile edge x = 500320) and points on centres,
    in the grid CRS; written elsewhere in other CRSs."""
    rows = [
        (box(X0 + 250, Y0 + 100, X0 + 400, Y0 + 250), 11, 2020, 2.0, "farm-a"),  # 2 tiles
        (box(X0 + 400, Y0 + 380, X0 + 600, Y0 + 580), 13, 2023, 1.0, "farm-b"),  # 200 m square
        (box(X0 + 20, Y0 + 400, X0 + 120, Y0 + 600), 13, 2023, 0.5, "farm-a"),
        (Point(X0 + 55, Y0 + 55), 13, None, 1.0, None),
        (Point(X0 + 605, Y0 + 25), 11, None, 3.0, None),
    ]
    geoms, codes, years, weights, groups = zip(*rows, strict=True)
    return gpd.GeoDataFrame(
        {"crop": codes, "year": years, "w": weights, "farm": groups},
        geometry=list(geoms),
        crs=GRID.crs,
    )


def write_vector(frame: gpd.GeoDataFrame, path, crs: str = "EPSG:4326", **kwargs) -> str:
    """Write `frame` reprojected to `crs` in the format named by the suffix of `path`."""
    frame = frame.to_crs(crs)
    if path.suffix == ".parquet":
        frame.to_parquet(path, **kwargs)
    else:
        frame.to_file(path, driver=FORMATS[path.suffix[1:]], **kwargs)
    return str(path)


def write_raster(path, codes: np.ndarray, geobox) -> str:
    profile = dict(driver="GTiff", width=codes.shape[1], height=codes.shape[0], count=1)
    profile.update(dtype="uint8", crs=str(geobox.crs), transform=geobox.transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes.astype(np.uint8), 1)
    return str(path)


@pytest.fixture
def nomenclature(tmp_path):
    doc = {
        "name": "Test LC",
        "unknown_codes": [0, 250],
        "classes": [
            {"code": 11, "name": "Cropland", "color": "#e8b32e", "description": "Annual crops."},
            {"code": 13, "name": "Grassland", "color": "#8fce3c", "description": "Grass."},
        ],
    }
    path = tmp_path / "nomenclature.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def config(nomenclature: str, *sources: dict) -> LabelsConfig:
    return LabelsConfig(nomenclature=nomenclature, sources=tuple(LabelSource(**s) for s in sources))


def stitched(labels: LabelsConfig, nomenclature: str, **kwargs) -> dict[str, np.ndarray]:
    """Every tile read on its own, placed into the extent."""
    nom = load_nomenclature(nomenclature)
    out = {
        "codes": np.zeros(EXTENT.shape, np.uint8),
        "weight": np.zeros(EXTENT.shape, np.float32),
        "group": np.zeros(EXTENT.shape, np.int64),
    }
    for tile in TILES:
        got = read_tile_labels(labels, tile.geobox, nom, **kwargs)
        rows, cols = tile.slices_in(EXTENT)
        for name, array in out.items():
            array[rows, cols] = getattr(got, name)
    return out


def whole_extent_codes(path: str, buffer_m: float = 0.0) -> np.ndarray:
    """The expected codes: the whole file read at once and rasterised over the whole extent."""
    read = gpd.read_parquet if path.endswith(".parquet") else gpd.read_file
    frame = read(path).to_crs(GRID.crs)
    polygons = frame.geom_type == "Polygon"
    frame.loc[polygons, "geometry"] = frame.geometry[polygons].buffer(-buffer_m)
    frame = frame[~frame.geometry.is_empty]
    shapes = zip(frame.geometry, frame["crop"], strict=True)
    return rasterio.features.rasterize(
        shapes, out_shape=EXTENT.shape, transform=EXTENT.transform, fill=0, dtype="uint8"
    )


def pixels(x: float, y: float) -> tuple[int, int]:
    """(row, col) in the extent of grid coordinates (x, y)."""
    return int((EXTENT.boundingbox.top - y) // 10), int((x - EXTENT.boundingbox.left) // 10)


# ---------------------------------------------------------------------------- per tile
@pytest.mark.parametrize("suffix", list(FORMATS))
def test_tiles_stitched_equal_the_whole_extent(suffix, tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / f"ref.{suffix}")
    got = stitched(config(nomenclature, {"url": path, "class_column": "crop"}), nomenclature)
    expected = whole_extent_codes(path)
    np.testing.assert_array_equal(got["codes"], expected)
    assert (expected == 11).sum() == 15 * 15 + 1 and (expected == 13).sum() == 400 + 200 + 1
    assert (got["weight"][expected != UNKNOWN] == 1).all() and (
        got["weight"][expected == 0] == 0
    ).all()


@pytest.mark.parametrize("suffix", list(FORMATS))
def test_a_polygon_keeps_one_group_across_tiles_and_points_have_none(
    suffix, tmp_path, nomenclature
):
    path = write_vector(reference_features(), tmp_path / f"ref.{suffix}")
    got = stitched(config(nomenclature, {"url": path, "class_column": "crop"}), nomenclature)
    west, east = pixels(X0 + 315, Y0 + 175), pixels(X0 + 325, Y0 + 175)  # either side of the edge
    group = got["group"]
    assert group[west] == group[east] >= 0
    parcel = got["codes"] == 11
    parcel[pixels(X0 + 605, Y0 + 25)] = False  # the point
    assert parcel.sum() == 225 and (group[parcel] == group[west]).all()  # in both tiles
    square, strip = group[pixels(X0 + 500, Y0 + 480)], group[pixels(X0 + 70, Y0 + 500)]
    assert len({group[west], square, strip}) == 3
    assert group[pixels(X0 + 55, Y0 + 55)] == group[pixels(X0 + 605, Y0 + 25)] == NO_GROUP
    assert (group[got["codes"] == UNKNOWN] == NO_GROUP).all()
    again = stitched(config(nomenclature, {"url": path, "class_column": "crop"}), nomenclature)
    np.testing.assert_array_equal(again["group"], group)  # stable between reads


def test_group_column_ties_polygons_and_points_burn_one_pixel(tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / "ref.gpkg")
    source = {"url": path, "class_column": "crop", "group_column": "farm"}
    got = stitched(config(nomenclature, source), nomenclature)
    group = got["group"]
    assert group[pixels(X0 + 300, Y0 + 175)] == group[pixels(X0 + 70, Y0 + 500)]  # both farm-a
    assert group[pixels(X0 + 500, Y0 + 480)] != group[pixels(X0 + 70, Y0 + 500)]
    for x, y, code in ((X0 + 55, Y0 + 55, 13), (X0 + 605, Y0 + 25, 11)):
        row, col = pixels(x, y)
        assert got["codes"][row, col] == code
        assert (got["codes"][row - 1 : row + 2, col - 1 : col + 2] != UNKNOWN).sum() == 1


@pytest.mark.parametrize("suffix", ["gpkg", "parquet"])
def test_erosion_removes_the_rim_and_drops_what_vanishes(suffix, tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / f"ref.{suffix}", crs="EPSG:3035")
    source = {"url": path, "class_column": "crop", "buffer_m": 20}
    got = stitched(config(nomenclature, source), nomenclature)["codes"]
    square = got[pixels(X0 + 400, Y0 + 575)[0] : pixels(X0 + 400, Y0 + 385)[0] + 1, 40:60]
    assert square.shape == (20, 20) and (square == 13).sum() == 16 * 16
    assert (
        (square[2:-2, 2:-2] == 13).all() and (square[:2] == 0).all() and (square[:, -2:] == 0).all()
    )
    strip = got[pixels(X0, Y0 + 595)[0] : pixels(X0, Y0 + 405)[0] + 1, 2:12]  # 10 x 20 pixels
    assert (strip == 13).sum() == 6 * 16
    assert (got == 11).sum() == 11 * 11 + 1  # the 15 x 15 loses 2 px a side; the point stays
    np.testing.assert_array_equal(got, whole_extent_codes(path, buffer_m=20))
    gone = stitched(config(nomenclature, {**source, "buffer_m": 100}), nomenclature)["codes"]
    assert (gone == 13).sum() == 1 and (gone == 11).sum() == 1  # the square is gone too at 100 m


def test_year_filter_keeps_null_years_and_weights_come_from_their_column(tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / "ref.fgb")
    source = {"url": path, "class_column": "crop", "year_column": "year", "weight_column": "w"}
    got = stitched(config(nomenclature, source), nomenclature, years=(2023, 2024))
    assert (got["codes"] == 11).sum() == 1  # the 2020 parcel left out, the null-year point kept
    assert (got["codes"] == 13).sum() == 400 + 200 + 1
    assert got["weight"][pixels(X0 + 605, Y0 + 25)] == 3.0
    assert got["weight"][pixels(X0 + 70, Y0 + 500)] == 0.5
    every = stitched(config(nomenclature, source), nomenclature)
    assert every["weight"][pixels(X0 + 300, Y0 + 175)] == 2.0
    frame = reference_features()
    frame.loc[1, "w"] = 0.0
    bad = write_vector(frame, tmp_path / "bad.gpkg")
    with pytest.raises(LabelError, match=r"weight column 'w' of .*bad\.gpkg.*> 0"):
        stitched(config(nomenclature, {**source, "url": bad}), nomenclature)


def test_first_source_wins(tmp_path, nomenclature):
    vector = write_vector(reference_features().iloc[:1], tmp_path / "parcel.gpkg")
    grass = np.full((40, 40), 13)  # a ~20 m raster in EPSG:3035 over the whole region
    x0, y0, x1, y1 = EXTENT.extent.to_crs("EPSG:3035").boundingbox
    wider = GeoBox.from_bbox((x0 - 100, y0 - 100, x1 + 100, y1 + 100), "EPSG:3035", shape=(40, 40))
    raster = write_raster(tmp_path / "grass.tif", grass, wider)
    parcel = {"url": vector, "class_column": "crop"}
    got = stitched(config(nomenclature, parcel, {"url": raster}), nomenclature)
    inside = pixels(X0 + 300, Y0 + 175)
    assert got["codes"][inside] == 11 and got["group"][inside] >= 0
    assert (got["codes"] == 11).sum() == 225 and (got["codes"] == 13).sum() == 64 * 64 - 225
    assert (got["group"][got["codes"] == 13] == NO_GROUP).all()
    flipped = stitched(
        LabelsConfig(url=raster, nomenclature=nomenclature, sources=(LabelSource(**parcel),)),
        nomenclature,
    )
    assert (flipped["codes"] == 13).all() and (flipped["weight"] == 1).all()
    nom = load_nomenclature(nomenclature)
    np.testing.assert_array_equal(read_labels(raster, EXTENT, nom), flipped["codes"])


def test_geoparquet_with_a_bbox_covering_reads_row_groups_near_the_tile(tmp_path, nomenclature):
    frame = reference_features()
    far = gpd.GeoDataFrame({"crop": [99], "year": [None], "w": [1.0], "farm": [None]},
                           geometry=[box(X0 + 5000, Y0, X0 + 5100, Y0 + 100)], crs=GRID.crs)  # fmt: skip
    both = gpd.GeoDataFrame(pd.concat([frame, far], ignore_index=True), crs=GRID.crs)
    path = write_vector(both, tmp_path / "ref.parquet", write_covering_bbox=True, row_group_size=2)
    labels = config(nomenclature, {"url": path, "class_column": "crop"})
    np.testing.assert_array_equal(
        stitched(labels, nomenclature)["codes"],
        whole_extent_codes(write_vector(frame, tmp_path / "ref.gpkg")),
    )
    with pytest.raises(NomenclatureError, match=r"ref\.parquet.*\[99\]"):
        read_tile_labels(labels, GRID.tile(15, 0).geobox, load_nomenclature(nomenclature))


@pytest.mark.parametrize("suffix", ["gpkg", "geojson"])
def test_only_features_near_the_tile_are_read(suffix, tmp_path, nomenclature):
    """A far-away feature with an unknown code breaks the tile holding it, not the others."""
    frame = reference_features()
    frame.loc[len(frame)] = [99, None, 1.0, None, box(X0 + 5000, Y0, X0 + 5100, Y0 + 100)]
    path = write_vector(frame, tmp_path / f"ref.{suffix}")
    labels = config(nomenclature, {"url": path, "class_column": "crop"})
    nom = load_nomenclature(nomenclature)
    assert (read_tile_labels(labels, TILES[2].geobox, nom).codes != UNKNOWN).any()
    with pytest.raises(NomenclatureError, match=rf"ref\.{suffix}.*\[99\]"):
        read_tile_labels(labels, GRID.tile(15, 0).geobox, nom)
    with pytest.raises(NomenclatureError, match=rf"ref\.{suffix}.*\[99\]"):
        check_labels(labels, EXTENT, nom)


def test_unknown_codes_of_the_nomenclature_label_nothing(tmp_path, nomenclature):
    frame = reference_features()
    frame.loc[0, "crop"] = 250
    path = write_vector(frame, tmp_path / "ref.gpkg")
    got = stitched(config(nomenclature, {"url": path, "class_column": "crop"}), nomenclature)
    assert (got["codes"] == 11).sum() == 1 and (got["weight"][got["codes"] == 0] == 0).all()


# ---------------------------------------------------------------------------- errors and checks
def test_bad_sources_are_named(tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / "ref.gpkg")
    with pytest.raises(ValueError, match=r"ref\.gpkg is a vector file: set its class_column"):
        LabelSource(url=path)
    with pytest.raises(ValueError, match=r"labels\.url .*ref\.gpkg is a vector file"):
        LabelsConfig(url=path, nomenclature=nomenclature)
    with pytest.raises(ValueError, match="set `url` or at least one entry of `sources`"):
        LabelsConfig(nomenclature=nomenclature)
    with pytest.raises(ValueError, match=r"raster .*\['class_column'\] apply to vector files only"):
        LabelSource(url=str(tmp_path / "x.tif"), class_column="crop")
    labels = config(nomenclature, {"url": path, "class_column": "landcover"})
    with pytest.raises(LabelError, match=r"ref\.gpkg have no column 'landcover'"):
        read_tile_labels(labels, TILES[0].geobox, load_nomenclature(nomenclature))
    with pytest.raises(LabelError, match=r"ref\.gpkg have no column 'landcover'"):
        check_labels(labels, EXTENT, load_nomenclature(nomenclature))
    with pytest.raises(
        LabelError, match=r"labels .*ref\.csv: unknown file type '\.csv'; accepted: .*\.gpkg"
    ):
        source_kind(str(tmp_path / "ref.csv"))
    with pytest.raises(ValueError, match=r"ref\.csv: unknown file type"):
        LabelSource(url=str(tmp_path / "ref.csv"), class_column="crop")


def test_a_class_code_outside_the_nomenclature_names_the_file(tmp_path, nomenclature):
    frame = reference_features()
    frame.loc[2, "crop"] = 42
    path = write_vector(frame, tmp_path / "codes.fgb")
    labels = config(nomenclature, {"url": path, "class_column": "crop"})
    with pytest.raises(NomenclatureError, match=r"codes\.fgb has class codes \[42\]"):
        stitched(labels, nomenclature)
    frame["crop"] = frame["crop"].astype(str)
    frame.loc[2, "crop"] = "wheat"
    text = write_vector(frame, tmp_path / "text.gpkg")
    with pytest.raises(LabelError, match=r"class column 'crop' of .*text\.gpkg holds non-integer"):
        stitched(config(nomenclature, {"url": text, "class_column": "crop"}), nomenclature)


def test_check_labels_summarises_and_refuses_sources_outside_the_region(tmp_path, nomenclature):
    nom = load_nomenclature(nomenclature)
    gpkg = write_vector(reference_features(), tmp_path / "ref.gpkg")
    parquet = write_vector(reference_features(), tmp_path / "ref.parquet", crs="EPSG:3035")
    raster = write_raster(tmp_path / "lc.tif", np.full(EXTENT.shape, 11), EXTENT)
    rows = check_labels(
        LabelsConfig(url=raster, nomenclature=nomenclature, sources=(
            LabelSource(url=gpkg, class_column="crop"), LabelSource(url=parquet, class_column="crop"))),
        EXTENT, nom,
    )  # fmt: skip
    assert [(r["kind"], r.get("features"), r.get("pixels"), r["classes"]) for r in rows] == [
        ("raster", None, 64 * 64, [11]),
        ("vector", 5, None, [11, 13]),
        ("vector", 5, None, [11, 13]),
    ]
    assert [r["crs"] for r in rows] == ["EPSG:32631", "EPSG:4326", "EPSG:3035"]
    moved = reference_features().translate(xoff=50_000)
    far = write_vector(
        gpd.GeoDataFrame(reference_features().drop(columns="geometry"), geometry=moved),
        tmp_path / "far.fgb",
    )
    with pytest.raises(
        LabelError, match=r"labels .*far\.fgb do not overlap the region .*its bounds"
    ):
        check_labels(config(nomenclature, {"url": far, "class_column": "crop"}), EXTENT, nom)


def test_fingerprint_follows_bytes_and_settings(tmp_path, nomenclature):
    path = write_vector(reference_features(), tmp_path / "ref.gpkg")
    base = config(nomenclature, {"url": path, "class_column": "crop"})
    same = labels_fingerprint(base)
    assert labels_fingerprint(config(nomenclature, {"url": path, "class_column": "crop"})) == same
    assert (
        labels_fingerprint(
            config(nomenclature, {"url": path, "class_column": "crop", "buffer_m": 5})
        )
        != same
    )
    frame = reference_features()
    frame.loc[0, "crop"] = 13
    write_vector(frame, tmp_path / "ref.gpkg")
    assert labels_fingerprint(base) != same


def test_sources_in_a_run_config_resolve_next_to_it(tmp_path):
    raw = demo_config_dict("data")
    raw["labels"] = {
        "nomenclature": "data/nomenclature.yaml",
        "sources": [{"url": "data/parcels.gpkg", "class_column": "crop", "buffer_m": 10}],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    labels = load_run_config(path).labels
    assert [s.url for s in labels.all_sources] == [str(tmp_path / "data" / "parcels.gpkg")]
    del raw["labels"]["sources"][0]["class_column"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"parcels\.gpkg is a vector file: set its class_column"):
        load_run_config(path)


@pytest.fixture
def s3_process(monkeypatch):
    """A moto server in its own process: GDAL (pyogrio) holds the GIL while it reads, so the
    conftest's in-process server could never answer it. Yields a fresh bucket's name."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from s3fs import S3FileSystem

    from pivotmap.tasks import storage
    from tests.procs import stop_group

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing-key-id"),
        ("AWS_SECRET_ACCESS_KEY", "testing-secret-key"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
    ):
        monkeypatch.setenv(key, value)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        S3FileSystem.clear_instance_cache()  # s3fs keeps clients made for another endpoint
        storage.s3_client().create_bucket(Bucket="labels")
        yield "labels"
    finally:
        stop_group(proc)
        S3FileSystem.clear_instance_cache()


def test_sources_on_object_storage_read_like_local_ones(s3_process, tmp_path, nomenclature):
    """Workers share nothing with the driver: labels on s3:// are read per tile there."""
    from pivotmap.tasks import storage

    s3_bucket = s3_process
    frame = reference_features()
    local = [
        write_vector(frame.iloc[:2], tmp_path / "ref.gpkg"),
        write_vector(frame.iloc[2:4], tmp_path / "ref.parquet", crs="EPSG:3035"),
        write_vector(frame.iloc[4:], tmp_path / "ref.fgb"),
    ]
    remote = [f"s3://{s3_bucket}/labels/{p.rsplit('/', 1)[1]}" for p in local]
    for path, url in zip(local, remote, strict=True):
        storage.copy_file(tmp_path / path, url)
    on_s3 = config(nomenclature, *({"url": u, "class_column": "crop"} for u in remote))
    here = config(nomenclature, *({"url": p, "class_column": "crop"} for p in local))
    got = stitched(on_s3, nomenclature)
    np.testing.assert_array_equal(got["codes"], stitched(here, nomenclature)["codes"])
    assert (got["codes"] != UNKNOWN).sum() == 225 + 400 + 200 + 2
    rows = check_labels(on_s3, EXTENT, load_nomenclature(nomenclature))
    assert [r["features"] for r in rows] == [2, 2, 1]
    assert labels_fingerprint(on_s3) == labels_fingerprint(on_s3) != labels_fingerprint(here)
