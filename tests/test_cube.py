"""The pivot cube on storage: CF metadata, codec chain, readable by plain xarray, S3 = local bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.pivot_data import build, write_obs

# Zarr warns about numcodecs codecs from every Dask thread.
pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs:UserWarning")


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
    names = [type(f).__name__ for f in enc["filters"]]
    assert names == ["TransposeCodec", "Delta", "Delta"]
    assert float(age.min()) >= 0 and float(age.max()) <= 366


def test_interpolated_days_are_a_constant_integer_step(local_cube):
    """Between two observations the stored codes step by a constant: delta² is zero there."""
    import zarr

    codes = zarr.open_group(str(local_cube), mode="r")["VV"][:, 5, 5].astype(np.int32)
    second = np.diff(codes, 2)
    obs_days = np.arange(1, 60, 6)
    inside = np.ones(second.size, bool)
    for d in obs_days:  # delta² at and right after an observation carries the new slope
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
