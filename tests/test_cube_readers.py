"""The obs and pivot cubes read by tools no one here wrote: TensorStore, zarrs, cf_xarray, plain
xarray and the GeoZarr validator, with the values zarr-python reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.pivot_data import EXTENT, build, write_obs

# What zarr-python, TensorStore and zarrs all implement (Zarr v3 core codecs).
CORE_CODECS = {"sharding_indexed", "transpose", "bytes", "blosc", "zstd", "gzip", "crc32c"}


@pytest.fixture(scope="module")
def cubes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readers")
    obs = {"s2": root / "obs_s2.zarr", "s1": root / "obs_s1.zarr"}
    write_obs(str(obs["s2"]), "s2", np.arange(0, 40, 5))
    write_obs(str(obs["s1"]), "s1", np.arange(1, 40, 6))
    build(str(root / "pivot.zarr"), {m: str(u) for m, u in obs.items()}, 40)
    return {"pivot": root / "pivot.zarr", "obs_s2": obs["s2"]}


def arrays(path: Path) -> dict[str, dict]:
    """Array name -> its zarr.json, for every array of a cube."""
    metas = {p.parent.name: json.loads(p.read_text()) for p in path.glob("*/zarr.json")}
    return {name: meta for name, meta in metas.items() if meta["node_type"] == "array"}


def codec_names(codecs: list[dict]) -> list[str]:
    """Every codec of a chain, the codecs inside a shard included."""
    names = []
    for codec in codecs:
        names.append(codec["name"])
        inner = codec.get("configuration", {})
        names += codec_names(inner.get("codecs", []) + inner.get("index_codecs", []))
    return names


def zarr_python(path: Path, name: str) -> np.ndarray:
    import zarr

    return zarr.open_array(str(path / name), mode="r")[...]


@pytest.mark.parametrize("which", ["pivot", "obs_s2"])
def test_every_codec_is_a_zarr_v3_core_codec(cubes, which):
    chains = {name: codec_names(meta["codecs"]) for name, meta in arrays(cubes[which]).items()}
    assert "B02" in chains and "sharding_indexed" in chains["B02"]
    unknown = {name: set(c) - CORE_CODECS for name, c in chains.items() if set(c) - CORE_CODECS}
    assert not unknown  # e.g. numcodecs.delta: TensorStore and zarrs cannot decode it


@pytest.mark.parametrize("which", ["pivot", "obs_s2"])
def test_tensorstore_reads_the_values_zarr_python_reads(cubes, which):
    ts = pytest.importorskip("tensorstore")
    for name in arrays(cubes[which]):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cubes[which] / name)}}
        values = ts.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(values, zarr_python(cubes[which], name), err_msg=name)


@pytest.mark.parametrize("which", ["pivot", "obs_s2"])
def test_zarrs_reads_the_values_zarr_python_reads(cubes, which):
    """zarrs' codec pipeline, strict: an unsupported codec fails instead of falling back."""
    import zarr

    pytest.importorskip("zarrs")
    for name in arrays(cubes[which]):
        expected = zarr_python(cubes[which], name)
        pipeline = {
            "codec_pipeline.path": "zarrs.ZarrsCodecPipeline",
            "codec_pipeline.strict": True,
        }
        with zarr.config.set(pipeline):
            arr = zarr.open_array(str(cubes[which] / name), mode="r")
            assert type(arr._async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
            values = arr[...]
        np.testing.assert_array_equal(values, expected, err_msg=name)


def test_plain_xarray_opens_without_a_warning(cubes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(cubes["pivot"])
        b08 = ds["B08"].isel(x=3, y=4).values
    assert np.isfinite(b08).any()


def test_cf_xarray_finds_the_axes_and_standard_names(cubes):
    pytest.importorskip("cf_xarray")
    ds = xr.open_zarr(cubes["pivot"])
    assert ds.cf.axes == {"X": ["x"], "Y": ["y"], "T": ["time"]}
    assert ds.cf.standard_names["projection_x_coordinate"] == ["x"]
    assert ds.cf.standard_names["projection_y_coordinate"] == ["y"]
    assert ds.cf.standard_names["time"] == ["time"]
    assert ds.x.attrs["units"] == "metre" and ds.time.encoding["units"].startswith("days since")
    assert ds.cf["B08"].cf["X"].name == "x"  # per variable, through its coordinates


def test_geozarr_grid_matches_the_cf_coordinates(cubes):
    """The `spatial:` transform puts pixel centres on the x/y coordinates, `proj:` is the CRS."""
    from pyproj import CRS

    ds = xr.open_zarr(cubes["pivot"])
    a, b, c, d, e, f = ds.attrs["spatial:transform"]
    cols, rows = np.arange(ds.sizes["x"]) + 0.5, np.arange(ds.sizes["y"]) + 0.5
    np.testing.assert_allclose(a * cols + c, ds.x.values)
    np.testing.assert_allclose(e * rows + f, ds.y.values)
    assert b == d == 0 and ds.attrs["spatial:shape"] == [ds.sizes["y"], ds.sizes["x"]]
    assert CRS.from_user_input(ds.attrs["proj:code"]) == CRS.from_wkt(
        ds.spatial_ref.attrs["crs_wkt"]
    )
    assert ds.attrs["spatial:bbox"] == pytest.approx(list(EXTENT.extent.boundingbox))


def geozarr_cli() -> str | None:
    """The `geozarr` command of geozarr-toolkit (it needs Python >= 3.12: its own environment)."""
    return os.environ.get("PIVOTMAP_GEOZARR") or shutil.which("geozarr")


@pytest.mark.skipif(not geozarr_cli(), reason="geozarr-toolkit (Python >= 3.12) not installed")
@pytest.mark.parametrize("which", ["pivot", "obs_s2"])
def test_geozarr_toolkit_validates_the_cube(cubes, which):
    out = subprocess.run(
        [str(geozarr_cli()), "validate", str(cubes[which]), "--verbose"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[OK] spatial" in out.stdout and "[OK] proj" in out.stdout
