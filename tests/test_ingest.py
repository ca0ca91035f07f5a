"""The ingest stage on a copy of the real Flanders catalogue (Aug–Sep 2017), without Prefect.

Covers the obs cubes' content, idempotency and `force`, corrupt or missing COGs, items without SCL,
S1 orbit direction, SCL dilation, and the GDAL settings handed to readers.
"""

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import xarray as xr

from pivotmap.config import RunConfig
from pivotmap.results import IngestResult
from pivotmap.runtime import run_logger
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.ingest import batches, blocks, ingest, one_orbit_per_day
from pivotmap.tasks.load import by_day, dilate, load_s2
from pivotmap.tasks.stac_source import SourceError, search_items
from pivotmap.tasks.storage import gdal_env
from pivotmap.tasks.workspace import Workspace

PATCH = (501360, 5629040, 502000, 5629680)
PATCH_DIR = Path("catalogue-not-read")
MASK = (0, 1, 3, 8, 9, 10)


@pytest.fixture
def catalogue(flanders, tmp_path):
    """A private copy of the Flanders catalogue that a test may damage."""
    return shutil.copytree(flanders, tmp_path / "flanders", ignore=shutil.ignore_patterns("labels"))


def _config(catalog, **ingest) -> RunConfig:
    return RunConfig.model_validate({
        "name": "flanders-test",
        "source": {"kind": "static", "url": str(catalog / "catalog.json")},
        "grid": {"crs": "EPSG:32631", "resolution": 10, "tile_size": 64,
                 "origin_x": 501360, "origin_y": 5629040},
        "region": {"bbox": list(PATCH), "crs": "EPSG:32631"},
        "period": {"start": "2017-08-01", "end": "2017-09-30"},
        "ingest": ingest,
    })  # fmt: skip


def _ingest(config: RunConfig, out: str, force: bool = False) -> IngestResult:
    return ingest(Workspace.open(config, out), force)


def _obs(out, modality):
    return xr.open_zarr(out / "cube" / f"obs_{modality}.zarr", chunks=None)


def test_obs_cubes_hold_masked_reflectance_and_db_and_reruns_read_nothing(catalogue, tmp_path):
    out = tmp_path / "out"
    config = _config(catalogue)
    summary = _ingest(config, str(out))
    s2, s1 = summary.modalities["s2"], summary.modalities["s1"]
    assert (s2.items_used, s2.dates, s2.skipped_items) == (10, 10, [])
    assert s1.items_used == s1.dates == 21 and s1.orbit_states == {"ascending": 21}
    obs = _obs(out, "s2")
    items = search_items("static", config.source.url, "sentinel-2-l2a", _region(), *_period())
    direct = load_s2(items, GridSpec("EPSG:32631", 10, 64, *PATCH[:2]).tile(0, 0).geobox, MASK)
    np.testing.assert_allclose(obs.B04.values, direct.B04.values, atol=0.6e-4)  # int16 at 1e-4
    assert (obs.B04.isnull().values == direct.B04.isnull().values).all()
    db = _obs(out, "s1")
    assert list(db.orbit_state.values) == [0] * 21  # CF flags: 0 = ascending
    assert db.orbit_state.attrs["flag_meanings"] == "ascending descending"
    assert -25 < float(db.VV.mean()) < 0 and float(db.VH.mean()) < float(db.VV.mean())

    for cog in catalogue.rglob("*.tif"):  # nothing can be read any more...
        cog.unlink()
    again = _ingest(config, str(out))  # ...and nothing needs to be
    assert all(
        m.tiles_written == [] and m.tiles_already_done == ["E501360mN5629040m"]
        for m in again.modalities.values()
    )
    assert _obs(out, "s2").B04.equals(obs.B04)
    forced = _ingest(config, str(out), force=True)
    skipped = forced.modalities["s2"].skipped_items
    assert len(skipped) == 10 and all(s["stage"] == "read" for s in skipped)
    assert "cannot read COG" in skipped[0]["reason"]
    assert _obs(out, "s2").B04.isnull().all()


def _region():
    from odc.geo.geom import box

    return box(*PATCH, "EPSG:32631").to_crs("EPSG:4326")


def _period():
    return dt.date(2017, 8, 1), dt.date(2017, 9, 30)


@pytest.fixture
def prefect_logging():
    """Prefect sets up its logging at the first `get_run_logger` (a first `run_logger`): it puts
    a console handler bound to the `sys.stderr` of that moment on the root logger and drops the
    handlers there. Done before the test, pytest's capture of the test's own records stays in
    place whichever test runs first (capfd only saw the lines when this test ran alone)."""
    run_logger("ingest")


def test_corrupt_or_missing_cog_skips_that_item_and_names_it(
    catalogue, tmp_path, prefect_logging, caplog
):
    s2_dir = catalogue / "sentinel-2-l2a"
    corrupt, missing = "S2X_31UDS_20170814_0_L2A", "S2X_31UDS_20170903_0_L2A"
    (s2_dir / corrupt / "B04.tif").write_bytes(b"II*\x00 this is not a COG")
    (s2_dir / missing / "SCL.tif").unlink()
    summary = _ingest(_config(catalogue), str(tmp_path / "out")).modalities["s2"]
    reasons = {s["item"]: s["reason"] for s in summary.skipped_items}
    assert set(reasons) == {corrupt, missing}
    assert all(r.startswith("cannot read COG") for r in reasons.values())
    assert summary.tiles_written[0]["read_failures"]
    failed = [r.getMessage() for r in caplog.records if "ingest.read_failed" in r.getMessage()]
    assert len(failed) == 2 and all(f"item={i}" in " ".join(failed) for i in (corrupt, missing))
    obs = _obs(tmp_path / "out", "s2")
    assert obs.B04.sel(time="2017-08-14").isnull().all()
    others = obs.B04.drop_sel(time=[np.datetime64("2017-08-14"), np.datetime64("2017-09-03")])
    assert int(others.notnull().any(["y", "x"]).sum()) >= 3  # the other items are there


def _drop_scl(catalogue, item_id):
    path = catalogue / "sentinel-2-l2a" / item_id / f"{item_id}.json"
    doc = json.loads(path.read_text())
    del doc["assets"]["scl"]
    path.write_text(json.dumps(doc))


def test_item_without_scl_is_an_error_or_skipped_as_configured(catalogue, tmp_path):
    _drop_scl(catalogue, "S2X_31UDS_20170824_0_L2A")
    with pytest.raises(SourceError, match="S2X_31UDS_20170824_0_L2A.*s2_without_scl: skip"):
        _ingest(_config(catalogue), str(tmp_path / "a"))
    summary = _ingest(_config(catalogue, s2_without_scl="skip"), str(tmp_path / "b"))
    (skip,) = summary.modalities["s2"].skipped_items
    assert skip["item"] == "S2X_31UDS_20170824_0_L2A" and "SCL asset present" in skip["reason"]
    assert summary.modalities["s2"].items_used == 9


def test_orbit_selection_and_changed_settings_reread(catalogue, tmp_path):
    with pytest.raises(SourceError, match="no items of 'sentinel-1-rtc'"):
        _ingest(_config(catalogue, s1_orbit_state="descending"), str(tmp_path / "d"))
    out = tmp_path / "out"
    first = _ingest(_config(catalogue), str(out)).modalities["s2"]
    wider = _ingest(_config(catalogue, scl_dilation_px=2), str(out)).modalities["s2"]
    assert first.tiles_written and wider.tiles_written  # new settings: read again
    valid = wider.tiles_written[0]["valid_fraction"]
    assert valid < first.tiles_written[0]["valid_fraction"]


def test_the_grid_is_part_of_a_finished_tile_key():
    """Tile ids do not carry the tile size: a changed grid must not reuse old tiles."""
    from pivotmap.tasks.ingest import inputs_key

    base = _config(PATCH_DIR)
    other = base.model_copy(update={"grid": base.grid.model_copy(update={"tile_size": 32})})
    assert inputs_key(base, []) == inputs_key(_config(PATCH_DIR), [])
    assert inputs_key(base, []) != inputs_key(other, [])


def test_one_orbit_per_day_keeps_the_common_direction(flanders):
    url = str(flanders / "catalog.json")
    items = search_items("static", url, "sentinel-1-rtc", _region(), *_period())
    twin = items[0].clone()
    twin.id, twin.properties["sat:orbit_state"] = "S1X_descending_twin", "descending"
    days, skipped = one_orbit_per_day(by_day([*items, twin]))
    assert sum(len(g) for g in days.values()) == len(items)
    assert skipped == [
        {
            "item": twin.id,
            "reason": "same solar day as a ascending pass (set ingest.s1_orbit_state)",
        }
    ]


def test_dilation_grows_the_mask_by_a_disc():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    grown = dilate(mask, 2)
    assert grown.sum() == 13 and grown[4, 2] and grown[2, 4] and not grown[2, 2]


def test_tiles_split_into_shard_blocks_and_batches_fit_memory():
    tile = GridSpec("EPSG:3035", 10, 1024, 0, 0).tile(3, 5)
    parts = blocks(tile)
    assert len(parts) == 16 and {b.grid.tile_size for b in parts} == {256}
    assert parts[0].bounds[:2] == tile.bounds[:2] and parts[-1].bounds[2:] == tile.bounds[2:]
    plan = batches([tile], n_dates=150, n_vars=10)
    assert sum(len(b) for b in plan) == 16 and len(plan) > 1  # 150 dates: not all at once


def test_gdal_env_carries_settings_not_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.internal:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    env = gdal_env({"GDAL_HTTP_TIMEOUT": "10"})
    assert env["AWS_S3_ENDPOINT"] == "minio.internal:9000" and env["AWS_HTTPS"] == "YES"
    assert env["AWS_REQUEST_PAYER"] == "requester" and env["GDAL_HTTP_TIMEOUT"] == "10"
    assert "s3cr3t" not in json.dumps(env)


def test_items_without_geometry_or_bbox_still_group_by_day():
    item = pystac.Item("x", None, None, dt.datetime(2020, 5, 1, 23, 30, tzinfo=dt.UTC), {})
    assert list(by_day([item])) == [np.datetime64("2020-05-01", "ns")]


def test_ingest_through_a_stac_api_equals_the_static_catalogue(flanders, tmp_path):
    from tests.stac_api import serve_catalog

    static = _ingest(_config(flanders), str(tmp_path / "static"))
    with serve_catalog(flanders) as url:
        config = _config(flanders).model_copy(
            update={"source": _config(flanders).source.model_copy(
                update={"kind": "api", "url": url, "page_size": 5, "timeout_s": 10})}
        )  # fmt: skip
        served = _ingest(config, str(tmp_path / "api"))
        assert url.hits["POST /search"] == 2 + 5  # 10 S2 and 21 S1 items, pages of 5
    for m in ("s2", "s1"):
        assert served.modalities[m].item_ids == static.modalities[m].item_ids
        a, b = _obs(tmp_path / "api", m), _obs(tmp_path / "static", m)
        for var in a.data_vars:
            np.testing.assert_array_equal(a[var].values, b[var].values)


def test_ingest_config_is_validated():
    with pytest.raises(ValueError, match=r"ingest.scl_mask \[12\] are not SCL classes"):
        _config_dict_ingest({"scl_mask": [3, 12]})
    with pytest.raises(ValueError, match="exactly one of region.bbox, region.geojson"):
        RunConfig.model_validate({**_base(), "region": {"bbox": list(PATCH), "geojson": "x.json"}})
    assert _config_dict_ingest({"scl_mask": [11, 3, 3]}).ingest.scl_mask == (3, 11)


def _base() -> dict:
    return {
        "name": "t",
        "source": {"kind": "static", "url": "/nowhere/catalog.json"},
        "grid": {"crs": "EPSG:32631"},
        "region": {"bbox": list(PATCH), "crs": "EPSG:32631"},
        "period": {"start": "2017-08-01", "end": "2017-09-30"},
    }


def _config_dict_ingest(ingest: dict) -> RunConfig:
    return RunConfig.model_validate({**_base(), "ingest": ingest})


@pytest.mark.slow
def test_reads_run_on_a_dask_cluster_given_by_address(flanders, tmp_path):
    from distributed import LocalCluster

    local = _ingest(_config(flanders), str(tmp_path / "local"))
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster:
        config = _config(flanders, scheduler_address=cluster.scheduler_address)
        remote = _ingest(config, str(tmp_path / "dask"))
    assert remote.modalities["s2"].item_ids == local.modalities["s2"].item_ids
    for m in ("s2", "s1"):
        a, b = _obs(tmp_path / "dask", m), _obs(tmp_path / "local", m)
        assert all(a[v].equals(b[v]) for v in a.data_vars)


def test_obs_cubes_and_markers_live_in_an_s3_run_folder(s3_bucket, tmp_path):
    """A run folder on S3 (moto server): the obs cubes are Zarr on S3, the markers too."""
    from pivotmap.flows.demo import prepare_demo
    from pivotmap.tasks import storage

    config, _ = prepare_demo(tmp_path, 7, 1, 32, "2023-05-01", "2023-05-31")
    run = f"s3://{s3_bucket}/run"
    result = _ingest(config, run)
    (tile,) = result.tiles
    for m, var in (("s2", "B04"), ("s1", "VV")):
        done = result.modalities[m]
        assert done.cube == f"{run}/cube/obs_{m}.zarr" and done.tiles_written
        obs = xr.open_zarr(done.cube, consolidated=True, chunks=None)
        assert obs.sizes["time"] == done.dates > 0 and obs[var].notnull().any()
        assert storage.list_files(f"{run}/state/ingest-{m}", "*.json") == [
            f"{run}/state/ingest-{m}/{tile}.json"
        ]
    again = _ingest(config, run)  # the markers on S3 are found: nothing is read again
    assert all(m.tiles_already_done == [tile] for m in again.modalities.values())
    assert storage.read_text_or_none(f"{run}/reports/ingest.json") == again.to_json()


def _write_cog(path: Path, value: int) -> str:
    import rasterio
    from rasterio.transform import from_origin

    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint16",
               "crs": "EPSG:32631", "transform": from_origin(500000, 5630320, 10, 10),
               "tiled": True, "blockxsize": 16, "blockysize": 16}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((1, 32, 32), value, dtype="uint16"))
    return str(path)


def test_open_cogs_keep_files_up_to_a_limit_and_drop_a_failed_one(tmp_path):
    from pivotmap.tasks.load import OpenCogs

    cogs = OpenCogs(limit=2)
    hrefs = [_write_cog(tmp_path / f"b{i}.tif", i + 1) for i in range(3)]
    opened = []
    for href in hrefs:
        with cogs.open(href) as cog:
            opened.append(cog)
            assert int(cog.src.read(1)[0, 0]) == hrefs.index(href) + 1
    with cogs.open(hrefs[0]) as again:
        assert again is opened[0]  # kept open: not opened a second time
    assert opened[2].src.closed  # over the limit: closed after its read
    with pytest.raises(RuntimeError), cogs.open(hrefs[1]) as cog:
        raise RuntimeError("a read failed")
    assert cog.src.closed  # a failed file is not kept
    with cogs.open(hrefs[1]) as fresh:
        assert fresh is not cog and int(fresh.src.read(1)[0, 0]) == 2
    assert cogs.close_all() == 2 and opened[0].src.closed
    with cogs.open(hrefs[0], keep=False) as once:
        pass
    assert once.src.closed and cogs.close_all() == 0


def test_small_batches_read_the_same_cube_and_an_ingest_leaves_no_file_open(catalogue, tmp_path):
    from pivotmap.tasks import load

    base = _config(catalogue)
    grid = base.grid.model_copy(update={"tile_size": 32})  # 4 tiles: 4 batches at 1 MB
    small = base.model_copy(update={"grid": grid, "ingest": base.ingest.model_copy(
        update={"batch_mb": 1})})  # fmt: skip
    large = base.model_copy(update={"grid": grid})
    assert len(batches(Workspace.open(small, str(tmp_path / "a")).tiles(), 60, 11, 1 << 20)) == 4
    _ingest(small, str(tmp_path / "small"))
    assert not load.OPEN_COGS._files  # closed at the end of the ingest
    _ingest(large, str(tmp_path / "large"))
    for modality in ("s2", "s1"):
        a, b = _obs(tmp_path / "small", modality), _obs(tmp_path / "large", modality)
        xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    # a COG rewritten between two ingests is read afresh (nothing stale kept open)
    item = "S2X_31UDS_20170814_0_L2A"
    b04 = catalogue / "sentinel-2-l2a" / item / "B04.tif"
    before = _obs(tmp_path / "large", "s2").B04.sel(time="2017-08-14").values
    shutil.copy(catalogue / "sentinel-2-l2a" / "S2X_31UDS_20170903_0_L2A" / "B04.tif", b04)
    _ingest(large, str(tmp_path / "large"), force=True)
    after = _obs(tmp_path / "large", "s2").B04.sel(time="2017-08-14").values
    assert not np.array_equal(before, after, equal_nan=True)
