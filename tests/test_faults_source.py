"""Flaky sources: the tiny region's static catalogue (JSON and COGs) served over HTTP by a server
that fails 20 % of requests (503, reset connections, truncated bodies, slow answers).

The run must complete through retries and give the same products, byte for byte, as a clean run
over the same catalogue served without faults.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pivotmap.config import RunConfig
from tests import faults_data as fd
from tests.flaky_server import serve_flaky

pytestmark = [pytest.mark.faults, pytest.mark.slow]
FAULT_RATE, SEED = 0.2, 8
RESULTS: dict = {}  # figures for /work/notes/faults-table.md, printed at the end of the module


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("flaky") / "data"
    fd.make_region(data)
    return data


def _produce_over_http(region: Path, out: Path, rate: float) -> tuple[dict, dict]:
    from pivotmap.flows.produce import produce_flow

    with serve_flaky(region, rate=rate, seed=SEED, slow_s=0.3) as server:
        # One reader thread: requests come in a fixed order, so the seeded faults fall on the
        # same requests every time and the test is deterministic.
        raw = fd.config_dict(region, source={"url": server.url + "catalog.json",
                                             "max_retries": 4, "backoff_s": 0.05},
                             ingest={"workers": 1})  # fmt: skip
        summary = produce_flow(RunConfig.model_validate(raw), str(out)).to_dict()
    return summary, dict(server.counts)


@pytest.fixture(scope="module")
def clean_and_flaky(region, tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("flaky-runs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GDAL_HTTP_RETRY_DELAY", "0.1")  # GDAL's default backoff is 1 s, doubling
        clean = _produce_over_http(region, root / "clean", rate=0.0)
        flaky = _produce_over_http(region, root / "flaky", rate=FAULT_RATE)
    return (root / "clean", *clean), (root / "flaky", *flaky)


def test_flaky_source_run_completes_with_identical_products(clean_and_flaky):
    (clean, clean_summary, clean_counts), (flaky, summary, counts) = clean_and_flaky
    assert clean_counts.get("served", 0) > 100 and set(clean_counts) == {"served"}
    faults = {k: v for k, v in counts.items() if k != "served"}
    # every kind was injected, several times, at about the configured rate
    assert set(faults) == {"503", "reset", "truncate", "slow"} and min(faults.values()) >= 5
    assert 0.1 < sum(faults.values()) / counts["served"] < 0.3
    assert summary["ok"] and summary["items_skipped"] == {"s2": 0, "s1": 0}
    assert summary["items_used"] == clean_summary["items_used"]
    cogs, clean_cogs = fd.cog_digests(flaky), fd.cog_digests(clean)
    assert len(cogs) == 4 and cogs == clean_cogs  # 2 tiles x (class, confidence)
    differing = _cube_differences(clean, flaky)
    assert differing == {}
    RESULTS.update(requests=counts["served"], faults=faults, cogs=len(cogs),
                   bytes_differing=0, cube_variables_differing=len(differing))  # fmt: skip
    print(f"\nflaky source: {json.dumps(RESULTS, sort_keys=True)}")


def _cube_differences(a: Path, b: Path) -> dict[str, int]:
    """Per cube variable, the number of values that differ (NaN equal to NaN)."""
    import xarray as xr

    out = {}
    for name in ("obs_s2.zarr", "obs_s1.zarr", "pivot.zarr"):
        x = xr.open_zarr(a / "cube" / name, chunks=None)
        y = xr.open_zarr(b / "cube" / name, chunks=None)
        for var in x.data_vars:
            u, v = x[var].values, y[var].values
            same = (u == v) | (np.isnan(u) & np.isnan(v)) if u.dtype.kind == "f" else u == v
            if not same.all():
                out[f"{name}/{var}"] = int((~same).sum())
    return out


def test_truncated_cog_body_fails_the_read_never_gives_other_pixels(region):
    """Without the reader's own retry, a short body is an error, never silently other pixels."""
    from pivotmap.tasks.storage import gdal_env

    tifs = sorted(region.rglob("*.tif"))[:30]
    with serve_flaky(region, rate=0.5, seed=1, kinds=("truncate",)) as server:
        errors = wrong = 0
        with rasterio.Env(**gdal_env()):
            for tif in tifs:
                with rasterio.open(tif) as src:
                    expected = src.read(1)
                try:
                    url = server.url + tif.relative_to(region).as_posix()
                    with rasterio.open(url, sharing=False) as src:
                        wrong += not np.array_equal(src.read(1), expected)
                except rasterio.errors.RasterioIOError:
                    errors += 1
        assert server.counts["truncate"] > 5
    assert errors > 0 and wrong == 0


def test_remote_reads_retry_a_truncated_body_uncached(region):
    """The reader's retry reads the COG again from the server (GDAL caches the failure)."""
    from pivotmap.tasks.load import _read_raw
    from pivotmap.tasks.storage import gdal_env
    from pivotmap.tasks.synthetic import CRS

    tif = sorted((region / "sentinel-2-l2a").rglob("B04.tif"))[0]
    with rasterio.open(tif) as src:
        expected = src.read(1).astype("float32")
        from odc.geo.geobox import GeoBox

        geobox = GeoBox(src.shape, src.transform, CRS)
    with serve_flaky(region, rate=0.6, seed=3, kinds=("truncate",)) as server:
        url = server.url + tif.relative_to(region).as_posix()
        with rasterio.Env(**gdal_env()):
            (got,) = _read_raw(url, (geobox,), "nearest", "float32", np.nan)
        assert server.counts["truncate"] >= 1
    np.testing.assert_array_equal(got, expected)


def test_static_catalogue_over_http_is_retried_then_named(region):
    """Catalogue JSON: 503s and resets are retried; a server that never answers is named."""
    import datetime as dt

    from odc.geo.geom import box

    from pivotmap.tasks.stac_source import ApiSettings, SourceError, search_items

    aoi = box(2.99, 50.8, 3.02, 50.83, "EPSG:4326")
    period = (dt.date(2023, 1, 1), dt.date(2023, 12, 31))
    api = ApiSettings(timeout_s=10, max_retries=4, backoff_s=0.01)
    with serve_flaky(region, rate=0.25, seed=5, kinds=("503", "reset", "truncate")) as server:
        items = search_items("static", server.url + "catalog.json", "sentinel-2-l2a", aoi,
                             *period, api=api)  # fmt: skip
        assert len(items) == 25 and server.faults > 5
    with serve_flaky(region, rate=1.0, kinds=("503",)) as server:
        with pytest.raises(SourceError, match=r"catalog\.json: HTTP 503 \(after 4 retries\)"):
            search_items("static", server.url + "catalog.json", "sentinel-2-l2a", aoi, *period,
                         api=api)  # fmt: skip
        assert server.counts["served"] == 5  # bounded: 1 + 4 retries
    with serve_flaky(region, rate=0.0) as server:
        with pytest.raises(SourceError, match="STAC catalogue not found"):
            search_items("static", server.url + "nowhere.json", "sentinel-2-l2a", aoi, *period,
                         api=api)  # fmt: skip
