"""The pivot cube on storage: CF metadata, codec chain, readable by plain xarray, S3 = local bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.pivot_data import build, run_folder, write_obs


@pytest.fixture(scope="module")
def obs_urls(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("obs")
    urls = {"s2": str(root / "obs_s2.zarr"), "s1": str(root / "obs_s1.zarr")}
    write_obs(urls["s2"], "s2", np.arange(0, 60, 5))
    write_obs(urls["s1"], "s1", np.arange(1, 60, 6))
    return urls


@pytest.fixture(scope="module")
def local_cube(obs_urls, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pivot") / "pivot.zarr"
    build(str(path), obs_urls, 60)
    return path


def test_cf_metadata_and_codec_chain(local_cube):
    ds = xr.open_zarr(local_cube)
    assert list(ds.time.values[:2].astype("datetime64[D]").astype(str)) == [
        "2024-03-01",
        "2024-03-02",
    ]
    assert {"x", "y", "spatial_ref"} <= set(ds.coords) and ds.spatial_ref.attrs["crs_wkt"]
    b08, age = ds["B08"], ds["age_s2"]
    assert b08.attrs["grid_mapping"] == "spatial_ref" and age.attrs["units"] == "days"
    enc = b08.encoding
    assert enc["dtype"] == np.int16 and enc["scale_factor"] == 1e-4 and enc["_FillValue"] == -32768
    assert enc["chunks"][0] == 60 and enc["shards"] == (60, 32, 32)  # a pixel's year in one chunk
    assert [type(f).__name__ for f in enc["filters"]] == ["TransposeCodec"]  # time-last
    (blosc,) = enc["compressors"]
    assert (blosc.cname.value, blosc.shuffle.value, blosc.typesize) == ("zstd", "shuffle", 2)
    assert blosc.clevel == 3 and blosc.blocksize == 1 << 20  # pivot.zstd_level's default
    assert float(age.min()) >= 0 and float(age.max()) <= 366


def test_interpolated_days_are_a_constant_integer_step(local_cube):
    """Between two observations the stored codes step by a constant (the values the storage
    layout must keep: codecs change how they are stored, never what)."""
    import zarr

    codes = zarr.open_group(str(local_cube), mode="r")["VV"][:, 5, 5].astype(np.int32)
    second = np.diff(codes, 2)
    obs_days = np.arange(1, 60, 6)
    inside = np.ones(second.size, bool)
    for d in obs_days:  # the second difference at and right after an obs carries the new slope
        inside[max(d - 2, 0) : d + 1] = False
    assert inside.sum() > 20 and np.all(second[inside] == 0)


def test_plain_xarray_reads_the_cube_without_pivotmap(local_cube):
    script = (
        "import sys; sys.modules['pivotmap'] = None\n"
        "import xarray as xr\n"
        f"cube = xr.open_zarr({str(local_cube)!r})\n"
        "print(float(cube.B08.sel(x=cube.x[3], y=cube.y[4], method='nearest').mean()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    expected = float(xr.open_zarr(local_cube).B08.isel(x=3, y=4).mean())
    assert float(out.stdout.strip()) == pytest.approx(expected)


def test_s3_and_local_give_the_same_bytes(obs_urls, local_cube, s3_bucket):
    from pivotmap.tasks.storage import s3_client

    build(f"s3://{s3_bucket}/pivot.zarr", obs_urls, 60)
    client = s3_client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    remote = {
        k.removeprefix("pivot.zarr/"): client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()
        for k in keys
    }
    local = {
        str(p.relative_to(local_cube)): p.read_bytes() for p in local_cube.rglob("*") if p.is_file()
    }
    assert remote.keys() == local.keys()
    assert all(remote[k] == local[k] for k in local), [k for k in local if remote[k] != local[k]]
    ds = xr.open_zarr(f"s3://{s3_bucket}/pivot.zarr")
    xr.testing.assert_identical(ds.load(), xr.open_zarr(local_cube).load())


def test_reader_decodes_windows_to_float32_with_nan_and_sampled_days(local_cube):
    from pivotmap.tasks.cube import PivotReader, open_cube

    reader = PivotReader(str(local_cube))
    assert reader.times.dtype == np.dtype("datetime64[ns]") and len(reader.times) == 60
    window = reader.window(slice(2, 9), slice(20, 32), step_days=7)
    assert dict(window.sizes) == {"time": 9, "y": 7, "x": 12}
    np.testing.assert_array_equal(window.time.values, reader.times[::7])
    cf = open_cube(str(local_cube)).isel(y=slice(2, 9), x=slice(20, 32), time=slice(0, None, 7))
    for name, var in window.data_vars.items():
        assert var.dtype == np.float32 and "scale_factor" not in var.attrs
        np.testing.assert_allclose(var.values, cf[name].values, rtol=1e-6, equal_nan=True)
    assert np.isnan(window["B02"].values).any()  # unfilled days read as NaN, not as -32768


def test_reader_raw_int16_and_points_agree_with_windows(local_cube):
    import zarr

    from pivotmap.tasks.cube import FILL, PivotReader

    reader = PivotReader(str(local_cube))
    raw = reader.window(slice(0, 32), slice(0, 32), dtype="int16")
    stored = zarr.open_group(str(local_cube), mode="r")["B08"][:]
    assert raw["B08"].dtype == np.int16 and (raw["B08"].values == stored).all()
    assert (stored == FILL).any() and raw["B08"].attrs["_FillValue"] == FILL
    rows, cols = np.array([0, 5, 31]), np.array([3, 5, 0])
    points = reader.points(rows, cols, step_days=2)
    assert dict(points.sizes) == {"time": 30, "pixel": 3}
    window = reader.window(slice(0, 32), slice(0, 32), step_days=2)
    for name, var in points.data_vars.items():
        assert var.dtype == np.float32
        expected = window[name].values[:, rows, cols]
        np.testing.assert_array_equal(var.values, expected)
    with pytest.raises(ValueError, match="float32 or raw int16"):
        reader.window(slice(0, 1), slice(0, 1), dtype="float64")


def test_iter_windows_covers_a_span_row_by_row():
    from pivotmap.tasks.cube import iter_windows

    windows = list(iter_windows((10, 15), (100, 107), 3))
    assert windows[:3] == [
        (slice(10, 13), slice(100, 103)),
        (slice(10, 13), slice(103, 106)),
        (slice(10, 13), slice(106, 107)),
    ]
    assert windows[-1] == (slice(13, 15), slice(106, 107)) and len(windows) == 6


def test_pivot_stage_in_an_s3_run_folder_equals_the_local_build(tmp_path, s3_bucket):
    from pivotmap.results import PivotResult
    from pivotmap.tasks.cube import PivotReader
    from pivotmap.tasks.pivot import build_pivot

    local, remote = run_folder(str(tmp_path / "run")), run_folder(f"s3://{s3_bucket}/run")
    built = {ws.root: build_pivot(ws) for ws in (local, remote)}
    assert built[remote.root].cube_version == built[local.root].cube_version
    assert built[remote.root].mode == "create" and built[remote.root].quality["success"]
    assert remote.read_result(PivotResult) == built[remote.root]
    assert remote.is_done("pivot", local.tiles()[0].id, built[local.root].cube_version)
    windows = [
        PivotReader(ws.pivot_url).window(slice(3, 20), slice(0, 32), 3) for ws in (local, remote)
    ]
    xr.testing.assert_identical(windows[0], windows[1])
    assert build_pivot(remote).mode == "current"  # nothing new: nothing rewritten


def test_a_tile_job_needs_nothing_but_urls_in_an_s3_run_folder(tmp_path, s3_bucket):
    """Weights, spec, cube and map all at s3://: the same map as from a local run folder."""
    import io

    import torch

    from pivotmap.models.inference import TileJob, load_for_worker, run_tile_job, save_for_workers
    from pivotmap.models.network import ModelSpec, build_model
    from pivotmap.tasks import storage
    from pivotmap.tasks.pivot import build_pivot

    torch.manual_seed(0)
    spec = ModelSpec(classes=(1, 2, 3), n_steps=12, step_days=5, hidden=16)
    model = build_model(spec).eval()
    maps = []
    for ws in (run_folder(str(tmp_path / "run")), run_folder(f"s3://{s3_bucket}/run")):
        build_pivot(ws)
        model_url = save_for_workers(model, spec, ws.model_url("m", "1"))
        job = TileJob("t", (0, 32), (0, 32), ws.pivot_url, model_url, ws.map_url("t"), 256, 16)
        assert run_tile_job(job)["mapped_fraction"] > 0.9
        with np.load(io.BytesIO(storage.read_bytes(ws.map_url("t")))) as data:
            maps.append((data["classes"], data["confidence"]))
    load_for_worker.cache_clear()
    assert all((a == b).all() for a, b in zip(maps[0], maps[1], strict=True))


@pytest.mark.filterwarnings("ignore:Numcodecs codecs:UserWarning")  # the old layout, on purpose
def test_a_cube_with_an_older_storage_layout_is_rebuilt_not_appended_to(tmp_path, monkeypatch):
    """A pivot written with the numcodecs delta filters (layout 1) is rebuilt by the stage with
    core codecs only, to the same values."""
    import zarr
    from zarr.codecs.numcodecs import Delta

    from pivotmap.tasks import cube
    from pivotmap.tasks.cube import PivotReader
    from pivotmap.tasks.pivot import build_pivot

    def delta_encoding(*args, **kwargs):
        enc = new_encoding(*args, **kwargs)
        for name in [n for n in enc if n in cube.VARIABLES]:
            enc[name]["filters"] = [*enc[name]["filters"], Delta(dtype="int16")]
        return enc

    new_encoding = cube.encoding
    ws = run_folder(str(tmp_path / "run"))
    monkeypatch.setattr(cube, "LAYOUT_VERSION", "1")
    monkeypatch.setattr(cube, "encoding", delta_encoding)
    build_pivot(ws)

    def codecs() -> str:
        return json.dumps(zarr.open_array(ws.pivot_url + "/B08", mode="r").metadata.to_dict())

    assert "numcodecs.delta" in codecs()
    old = PivotReader(ws.pivot_url).window(slice(0, 32), slice(0, 32), dtype="int16")
    monkeypatch.undo()
    rebuilt = build_pivot(ws)
    assert rebuilt.mode == "create" and "storage layout" in rebuilt.reason
    assert "numcodecs" not in codecs() and "blosc" in codecs()
    new = PivotReader(ws.pivot_url).window(slice(0, 32), slice(0, 32), dtype="int16")
    xr.testing.assert_equal(new, old)  # the same int16 codes (the state attributes differ)


def test_the_pivot_zstd_level_is_a_setting_that_rebuilds_nothing():
    import datetime as dt
    from types import SimpleNamespace

    from pivotmap.config import PivotConfig
    from pivotmap.tasks import cube
    from pivotmap.tasks.pivot import daily_times, target_state
    from tests.pivot_data import EXTENT

    start, end = dt.date(2024, 3, 1), dt.date(2024, 3, 10)
    times = daily_times(start, end)
    tmpl = cube.template(EXTENT, times, ["B08"], {})
    for level in (3, 5):
        enc = cube.encoding(tmpl, 32, 32, cube.pivot_layout(None, len(times), level))
        assert enc["B08"]["compressors"][0].clevel == level

    def key(level: int) -> str:
        config = SimpleNamespace(
            grid=PivotConfig(), period=SimpleNamespace(start=start, end=end),
            pivot=PivotConfig(zstd_level=level),
        )  # fmt: skip
        ingest = SimpleNamespace(modalities={"s2": SimpleNamespace(item_ids=["a"])})
        obs = {"s2": {"time": np.array([19783], dtype="int64")}}
        return target_state(config, ingest, obs).version

    assert key(3) == key(5)  # an existing cube keeps its level: no rebuild


def test_the_region_calendar_is_read_in_windows_and_a_missing_season_moves_nothing(tmp_path):
    """`predict.calendar_shift: auto` (the default) samples the run's cube in windows; a model
    that keeps no season, or one learnt on a period of another length, is not moved and the
    result says why; the season of the cube itself is found at shift 0. A tile job with a
    shift classifies its series moved (another map than without)."""
    import io

    import torch

    from pivotmap.models.calendar import region_sample, season_profile
    from pivotmap.models.inference import (
        TileJob,
        calendar_shift,
        load_for_worker,
        run_tile_job,
        save_for_workers,
    )
    from pivotmap.models.network import ModelSpec, build_model
    from pivotmap.tasks import storage
    from pivotmap.tasks.pivot import build_pivot

    ws = run_folder(str(tmp_path / "run"))
    build_pivot(ws)
    spec = ModelSpec(classes=(1, 2, 3), n_steps=12, step_days=5, hidden=16)
    series = region_sample(ws.pivot_url, spec, 600)
    assert series.shape[1:] == (12, len(spec.channels) - 2) and 500 <= len(series) <= 1024

    none = calendar_shift(ws, spec)
    assert (none.steps, none.method) == (0, "auto") and "records no season" in none.note
    other = calendar_shift(ws, spec.replace(season=(0.5,) * 20))
    assert other.steps == 0 and "gives 12 steps, the model's season 20" in other.note
    own = tuple(season_profile(series, spec.channels[:-2]))
    if np.std(own) >= 0.03:  # the test cube's made-up values may hold no season at all
        assert calendar_shift(ws, spec.replace(season=own)).steps == 0

    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():  # an untrained head says 1/3 everywhere: make it say something
        for p in model.parameters():
            p.mul_(4)
    model_url = save_for_workers(model, spec, ws.model_url("m", "1"))
    maps = []
    for shift in (0, 3):
        job = TileJob(
            "t", (0, 32), (0, 32), ws.pivot_url, model_url, ws.map_url("t"), 256, 16,
            shift_steps=shift,
        )  # fmt: skip
        run_tile_job(job)
        with np.load(io.BytesIO(storage.read_bytes(ws.map_url("t")))) as data:
            maps.append(data["confidence"])
    load_for_worker.cache_clear()
    assert not np.array_equal(maps[0], maps[1])
