"""A whole run folder on S3 (moto server on 127.0.0.1): every stage through the CLI, `--out s3://…`.

The stages run one by one, as an operator would run them, on a small generated demo region; the
same config run into a local folder gives the reference products. The run config and the input
catalogue stay local; MLflow keeps its SQLite store in a temporary folder (object storage has no
place for it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.small_runs import (
    TILE_SIZE,
    TILES,
    cli,
    generate_small_region,
    write_small_config,
)

pytestmark = pytest.mark.slow

STAGES = ("ingest", "pivot", "sample", "train", "predict", "publish")
BUCKET = "s3-run-folder"


def _cli(argv: list[str]) -> tuple[int, dict, str]:
    """`pivotmap ARGV --json`: (exit code, its JSON summary, the tail of its stdout)."""
    code, summary, stdout = cli(argv)
    return code, summary, stdout[-3000:]


def _stages(config: Path, out: str) -> dict[str, tuple[int, dict, str]]:
    """Each stage into `out`, stopping at the first that fails."""
    done: dict[str, tuple[int, dict, str]] = {}
    for stage in STAGES:
        done[stage] = _cli([stage, "--config", str(config), "--out", out])
        if done[stage][0] != 0:
            break
    return done


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    """The generated demo region (FOLDER/data) that both runs read."""
    folder = tmp_path_factory.mktemp("region")
    generate_small_region(folder / "data")
    return folder


@pytest.fixture(scope="module")
def s3_run(region, s3_server, prefect_server, tmp_path_factory):
    """Every stage with `--out s3://BUCKET/run`, from an empty working directory."""
    from pivotmap.tasks.storage import s3_client

    s3_client().create_bucket(Bucket=BUCKET)
    mlflow = tmp_path_factory.mktemp("mlflow-s3")
    config = write_small_config(region, "s3.yaml", mlflow / "mlflow.db")
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        stages = _stages(config, f"s3://{BUCKET}/run")
    return stages, _keys(BUCKET, "run/"), cwd


@pytest.fixture(scope="module")
def local_run(region, tmp_path_factory) -> Path:
    """The same config, MLflow store apart, run into a local folder."""
    mlflow = tmp_path_factory.mktemp("mlflow-local")
    config = write_small_config(region, "local.yaml", mlflow / "mlflow.db")
    out = tmp_path_factory.mktemp("local-run")
    stages = _stages(config, str(out))
    failed = {s: r[2] for s, r in stages.items() if r[0] != 0}
    assert not failed, f"the local reference run failed: {failed}"
    return out


def _keys(bucket: str, prefix: str) -> set[str]:
    return set(_etags(bucket, prefix))


def _etags(bucket: str, prefix: str) -> dict[str, str]:
    """Key (less `prefix`) -> ETag of every object under `prefix`."""
    from pivotmap.tasks.storage import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {
        obj["Key"][len(prefix) :]: obj["ETag"] for page in pages for obj in page.get("Contents", [])
    }


def _s3_bytes(key: str) -> bytes:
    from pivotmap.tasks.storage import s3_client

    return s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _version(keys: set[str]) -> str:
    """The one product version published (products/<version>/collection.json)."""
    (version,) = {k.split("/")[1] for k in keys if k.startswith("products/") and k.count("/") == 2}
    return version


def _tiles(keys: set[str]) -> set[str]:
    return {k.split("/")[-1].removesuffix(".json") for k in keys if k.startswith("state/pivot/")}


def test_every_stage_runs_with_its_run_folder_on_s3(s3_run):
    stages, _, _ = s3_run
    failed = {stage: tail for stage, (code, _, tail) in stages.items() if code != 0}
    assert not failed and list(stages) == list(STAGES), failed
    assert all(summary.get("ok", True) for _, summary, _ in stages.values())


def test_cube_state_results_and_maps_are_objects_in_the_bucket(s3_run):
    _, keys, cwd = s3_run
    tiles = _tiles(keys)
    assert len(tiles) == TILES * TILES
    for cube in ("obs_s2", "obs_s1", "pivot"):
        assert f"cube/{cube}.zarr/zarr.json" in keys, cube
    for stage in ("ingest-s2", "ingest-s1", "pivot", "predict"):
        assert {f"state/{stage}/{t}.json" for t in tiles} <= keys, stage
    assert {f"reports/{stage}.json" for stage in STAGES} <= keys
    assert {f"maps/{t}.npz" for t in tiles} <= keys
    version = _version(keys)
    products = {
        f"products/{version}/{t}/{t}_{kind}.tif" for t in tiles for kind in ("class", "confidence")
    }
    assert {"products/catalog.json", f"products/{version}/collection.json"} | products <= keys
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing written where it was run from


def test_the_cube_on_s3_opens_with_xarray(s3_run):
    import xarray as xr

    from pivotmap.tasks.storage import s3_client

    endpoint = s3_client().meta.endpoint_url  # the moto server's, from the environment
    cube = xr.open_zarr(
        f"s3://{BUCKET}/run/cube/pivot.zarr",
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
    )
    assert {"B04", "VV", "age_s2", "age_s1"} <= set(cube.data_vars)
    assert cube.sizes["x"] == cube.sizes["y"] == TILES * TILE_SIZE


def test_published_catalog_on_s3_opens_and_downloads(s3_run, tmp_path, tmp_path_factory):
    import pystac
    import rasterio

    from pivotmap.tasks.stac_source import S3StacIO

    _, keys, _ = s3_run
    href = f"s3://{BUCKET}/run/products/catalog.json"
    catalog = pystac.Catalog.from_file(href, stac_io=S3StacIO())
    items = list(catalog.get_items(recursive=True))
    assert len(items) == TILES * TILES
    for item in items:
        assert item.assets["class"].get_absolute_href().startswith(f"s3://{BUCKET}/run/products/")
    local = str(tmp_path_factory.getbasetemp())  # the inputs, the config and MLflow live there
    for key in sorted(k for k in keys if k.startswith("products/") and k.endswith(".json")):
        assert local not in _s3_bytes(f"run/{key}").decode(), f"{key} names a local path"
    bbox = _lonlat_bbox(pad=0.001)
    code, _, tail = _cli(
        ["download", "--catalog", href, "--bbox", bbox, "--out", f"{tmp_path}/x.tif"]
    )
    assert code == 0, tail
    with rasterio.open(tmp_path / "x.tif") as src:
        downloaded = src.read(1)
    expected = 0
    for key in keys:
        if key.endswith("_class.tif") and "/E" in key:
            with rasterio.MemoryFile(_s3_bytes(f"run/{key}")) as mem, mem.open() as cog:
                expected += int((cog.read(1) != cog.nodata).sum())
    assert expected > 0 and int((downloaded != 255).sum()) == expected


def test_class_cogs_equal_those_of_a_local_run(s3_run, local_run):
    _, keys, _ = s3_run
    version = _version(keys)
    local_cogs = sorted(local_run.glob("products/*/E*/*_class.tif"))
    assert len(local_cogs) == TILES * TILES
    for cog in local_cogs:
        tile = cog.parent.name
        remote = _s3_bytes(f"run/products/{version}/{tile}/{cog.name}")
        assert remote == cog.read_bytes(), tile


def test_a_rerun_on_s3_resumes_from_its_markers_and_changes_no_product(s3_run, region):
    stages, keys, cwd = s3_run
    before = _etags(BUCKET, "run/products/")
    again = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for stage in ("ingest", "pivot", "predict", "publish"):
            again[stage] = _cli(
                [stage, "--config", str(region / "s3.yaml"), "--out", f"s3://{BUCKET}/run"]
            )
    assert all(code == 0 for code, _, _ in again.values()), {s: r[2] for s, r in again.items()}
    tiles = _tiles(keys)
    for modality in again["ingest"][1]["modalities"].values():
        assert set(modality["tiles_already_done"]) == tiles and not modality["tiles_written"]
    assert again["pivot"][1]["cube_version"] == stages["pivot"][1]["cube_version"]
    assert set(again["predict"][1]["tiles_already_done"]) == tiles
    assert again["publish"][1]["already_published"] is True
    assert _etags(BUCKET, "run/products/") == before
    assert sorted(p.name for p in cwd.iterdir()) == []


def _lonlat_bbox(pad: float) -> str:
    """The demo region in lon/lat (EPSG:4326), `pad` degrees larger on each side."""
    from pyproj import Transformer

    from pivotmap.flows.demo import demo_config_dict

    grid = demo_config_dict()["grid"]
    x0, y0 = grid["origin_x"], grid["origin_y"]
    edge = TILES * TILE_SIZE * grid["resolution"]
    to_lonlat = Transformer.from_crs(grid["crs"], "EPSG:4326", always_xy=True)
    west, south, east, north = to_lonlat.transform_bounds(x0, y0, x0 + edge, y0 + edge)
    return f"{west - pad},{south - pad},{east + pad},{north + pad}"
