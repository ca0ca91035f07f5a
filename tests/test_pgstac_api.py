"""Ingest from a real STAC API: the Flanders catalogue in PostgreSQL/PostGIS via pypgstac, served
by stac-fastapi-pgstac behind a gate that wants a bearer token (tests/pgstac.py), its COGs on an
HTTP server that wants it too.

Checked: the same items and the same obs cubes as the static catalogue; paging; `max_cloud_cover`
sent as a CQL2 filter (or through the query extension) and items trimmed with `fields`, so fewer
bytes come back for the same cube, with the client-side fallback on an API without them; the
token required, honoured and never logged; PostgreSQL stopped and restarted mid-search and
mid-ingest ending in a completed run with the retries counted. Skips cleanly without the real
data or without PostgreSQL/PostGIS (`.ci/run` installs them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil

import numpy as np
import pytest
import rasterio
import xarray as xr
from odc.geo.geom import box

from pivotmap.config import RunConfig
from pivotmap.tasks.ingest import ingest
from pivotmap.tasks.stac_source import ApiSettings, SourceError, find_items, search_items
from pivotmap.tasks.storage import gdal_env
from pivotmap.tasks.workspace import Workspace
from tests import pgstac

PATCH = (501360, 5629040, 502000, 5629680)
START, END = dt.date(2017, 8, 1), dt.date(2018, 11, 30)
TOKEN = "pgstac-test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
S2, S1 = "sentinel-2-l2a", "sentinel-1-rtc"


def _region():
    return box(*PATCH, "EPSG:32631").to_crs("EPSG:4326")


@pytest.fixture(scope="module")
def stack(flanders, tmp_path_factory):
    reason = pgstac.skip_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("pgstac")
    catalog = flanders / "catalog.json"
    with pgstac.pgstac_api(catalog, folder, required_headers=AUTH, asset_headers=AUTH) as s:
        yield s


@pytest.fixture
def gate(stack):
    stack.gate.reset()
    yield stack.gate
    stack.gate.reset()


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("PIVOTMAP_TEST_STAC_TOKEN", TOKEN)
    return "PIVOTMAP_TEST_STAC_TOKEN"


def _api(**kw) -> ApiSettings:
    return ApiSettings(**{"timeout_s": 20, "headers": AUTH, **kw})


def _ids(items):
    return [it.id for it in items]


# ---------------------------------------------------------------------------- searches


@pytest.mark.parametrize(("collection", "n_items"), [(S2, 118), (S1, 159)])
def test_search_pages_and_matches_the_static_catalogue(stack, gate, flanders, collection, n_items):
    assert stack.counts[collection] == n_items  # all loaded by pypgstac
    static_url = str(flanders / "catalog.json")
    for start, end in [(START, END), (dt.date(2017, 9, 1), dt.date(2017, 9, 30))]:
        static = search_items("static", static_url, collection, _region(), start, end)
        before = gate.requests["POST /search"]
        found = find_items("api", stack.api, collection, _region(), start, end,
                           api=_api(page_size=10))  # fmt: skip
        pages = gate.requests["POST /search"] - before
        assert _ids(found.items) == _ids(static), (collection, start, end)
        assert pages == max(1, math.ceil(len(static) / 10)), pages
        assert found.info["duplicates"] == 0 and found.info["retries"] == 0
    assert len(static) < n_items and all(it.datetime.month == 9 for it in static)
    # the region goes as a counter-clockwise ring (RFC 7946)
    ring = gate.search_bodies[0]["intersects"]["coordinates"][0]
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False))
    assert area2 > 0
    far = box(10.0, 45.0, 10.1, 45.1, "EPSG:4326")
    assert search_items("api", stack.api, collection, far, START, END, api=_api()) == []


def test_cloud_filter_runs_on_the_server_and_transfers_less(stack, gate, flanders, tmp_path):
    """CQL2 filter + fields, the query extension, and the client-side fallback: same items."""
    static = search_items("static", str(flanders / "catalog.json"), S2, _region(), START, END)
    kept = {it.id for it in static if it.properties["eo:cloud_cover"] <= 30}
    assert 0 < len(kept) < len(static)

    def run(url: str, server_filter: bool = True):
        gate.reset()
        found = find_items("api", url, S2, _region(), START, END, max_cloud_cover=30,
                           api=_api(page_size=50, server_filter=server_filter))  # fmt: skip
        return found, gate.counts["search_bytes"]

    cql2, cql2_bytes = run(stack.api)
    client, client_bytes = run(stack.api, server_filter=False)
    assert cql2.info["cloud_filter"] == "cql2-json" and cql2.info["fields"] is True
    assert client.info["cloud_filter"] == "client" and client.info["fields"] is False
    assert {it.id for it in cql2.items} == kept and len(client.items) == len(static)
    assert cql2.info["items_received"] == len(kept) < client.info["items_received"]
    assert cql2_bytes < 0.5 * client_bytes, (cql2_bytes, client_bytes)
    # Items trimmed by `fields` keep what the reader needs.
    red = cql2.items[0].assets["red"]
    assert red.href.startswith(stack.assets.url) and "raster:bands" in red.extra_fields
    assert "eo:bands" not in red.extra_fields and "proj:transform" in red.extra_fields
    print(f"S2 search bytes: {cql2_bytes} server-side (cql2 + fields), {client_bytes} client-side")

    # The same database behind APIs with fewer extensions: query only, then neither.
    for extensions, expected in [("query,pagination", "query"), ("pagination", "client")]:
        with pgstac.serve_api(stack.postgres, tmp_path, extensions) as (url, _):
            found = find_items("api", url, S2, _region(), START, END, max_cloud_cover=30,
                               api=ApiSettings(timeout_s=20, page_size=50))  # fmt: skip
        assert found.info["cloud_filter"] == expected and found.info["fields"] is False
        want = kept if expected == "query" else {it.id for it in static}
        assert {it.id for it in found.items} == want, extensions


# ---------------------------------------------------------------------------- auth


def test_token_is_required_honoured_and_never_logged(stack, gate, token, caplog, flanders):
    with pytest.raises(SourceError, match=r"HTTP 401.*headers_env. or .source.bearer_token_env"):
        search_items("api", stack.api, S2, _region(), START, END, api=ApiSettings(timeout_s=5))
    wrong = ApiSettings(timeout_s=5, headers={"Authorization": "Bearer nope-0x42"})
    with pytest.raises(SourceError, match="HTTP 401.*check the token") as failed:
        search_items("api", stack.api, S2, _region(), START, END, api=wrong)
    assert "nope-0x42" not in str(failed.value)
    assert gate.counts["unauthorised"] == 2  # a 401 is not retried

    config = _config(flanders, stack.api, token)
    caplog.set_level(logging.DEBUG)  # pystac-client logs request headers at DEBUG
    from pivotmap.tasks.stac_source import asset_headers, item_source

    found = item_source(config.source).find(S2, _region(), START, END)
    assert len(found.items) == 118 and TOKEN not in caplog.text
    assert "Bearer" not in repr(item_source(config.source).settings)

    # COG reads: GDAL sends the header to the asset server, which refuses reads without it.
    href = found.items[0].assets["red"].href
    with rasterio.Env(**gdal_env(headers=asset_headers(config.source))), rasterio.open(href) as src:
        assert src.read(1).shape == (64, 64)
    other = found.items[1].assets["green"].href  # not in GDAL's cache of the read above
    with rasterio.Env(**gdal_env()), pytest.raises(rasterio.RasterioIOError):
        rasterio.open(other)
    assert stack.assets.counts["unauthorised"] >= 1

    # A variable that is not set is named, its (absent) value never guessed at.
    bad = config.source.model_copy(update={"bearer_token_env": "PIVOTMAP_NOT_SET_TOKEN"})
    with pytest.raises(SourceError, match="environment variable PIVOTMAP_NOT_SET_TOKEN"):
        item_source(bad)


# ---------------------------------------------------------------------------- faults


def test_database_restart_mid_search_is_retried_and_counted(stack, gate):
    """PostgreSQL stops while a search pages (the API answers 500, drops connections), and
    comes back 2 s later: the search completes with the same items and says how many retries."""
    threads = []

    def stop_on_second_page(method: str, path: str, n: int) -> None:
        if method == "POST" and path == "/search" and n == 2:
            threads.append(stack.postgres.restart_after(2.0))

    gate.on_request = stop_on_second_page
    found = find_items("api", stack.api, S1, _region(), START, END,
                       api=_api(page_size=20, max_retries=6, backoff_s=0.5))  # fmt: skip
    for thread in threads:
        thread.join()
    assert len(threads) == 1 and len(found.items) == 159
    assert found.info["retries"] >= 1 and gate.counts["status 500"] + gate.counts[
        "upstream_errors"] >= 1  # fmt: skip
    print(f"retries: {found.info['retries']}, gate: {dict(gate.counts)}")


def test_database_down_is_a_fault_not_not_found(stack, gate):
    """Retries exhausted while the database is down: the error says the API failed, never that
    the collection does not exist."""
    stack.postgres.stop()
    try:
        with pytest.raises(SourceError) as failed:
            search_items("api", stack.api, S2, _region(), START, END,
                         api=_api(max_retries=2, backoff_s=0.05))  # fmt: skip
    finally:
        stack.postgres.start()
    message = str(failed.value)
    assert "not found" not in message and "HTTP 500" in message and "after 2 retries" in message


def test_search_url_and_collection_url_say_what_to_give(stack):
    with pytest.raises(SourceError, match=r"item-search endpoint.*set `source.url` to the landing"):
        search_items("api", stack.direct + "search", S2, _region(), START, END)
    with pytest.raises(SourceError, match=r"collection 'sentinel-2-l2a' of a STAC API, not its"):
        search_items("api", stack.direct + f"collections/{S2}", S2, _region(), START, END)
    static_collection = stack.assets.url + f"{S2}/collection.json"  # served, but no API
    with pytest.raises(SourceError, match=r"is a Collection, not the landing page.*kind: static"):
        search_items("api", static_collection, S2, _region(), START, END, api=_api())


# ---------------------------------------------------------------------------- ingest


def _config(catalog_dir, url, token_env, **update) -> RunConfig:
    period = update.pop("period", {"start": "2017-08-01", "end": "2018-11-30"})
    source = {"kind": "api", "url": url, "bearer_token_env": token_env, "page_size": 25,
              "timeout_s": 20, "max_retries": 6, "backoff_s": 0.5}  # fmt: skip
    if catalog_dir is not None and url is None:
        source = {"kind": "static", "url": str(catalog_dir / "catalog.json")}
    return RunConfig.model_validate({
        "name": "pgstac-test",
        "source": source,
        "grid": {"crs": "EPSG:32631", "resolution": 10, "tile_size": 64,
                 "origin_x": 501360, "origin_y": 5629040},
        "region": {"bbox": list(PATCH), "crs": "EPSG:32631"},
        "period": period,
        "ingest": update.pop("ingest", {}),
    })  # fmt: skip


def _obs(out, modality):
    return xr.open_zarr(out / "cube" / f"obs_{modality}.zarr", chunks=None)


def _same_cubes(a_dir, b_dir, modalities=("s2", "s1")) -> None:
    for m in modalities:
        a, b = _obs(a_dir, m), _obs(b_dir, m)
        assert list(a.data_vars) == list(b.data_vars) and (a.time.values == b.time.values).all()
        for var in a.data_vars:
            np.testing.assert_array_equal(a[var].values, b[var].values)


@pytest.mark.slow
def test_ingest_from_pgstac_equals_static_with_server_filter_and_a_restart(
    stack, gate, token, flanders, tmp_path
):
    """The full period, both modalities: a cloud ceiling applied by the server, PostgreSQL
    restarted during the S1 search — same item ids and identical obs cubes to the static run,
    and the report says where the filter ran and how many retries there were."""
    ceiling = {"max_cloud_cover": 60}
    static = ingest(Workspace.open(_config(flanders, None, None, ingest=ceiling),
                                   str(tmp_path / "static")))  # fmt: skip
    threads = []

    def stop_during_s1(method: str, path: str, n: int) -> None:
        if method == "POST" and path == "/search" and gate.search_bodies[-1].get(
            "collections") == [S1] and not threads:  # fmt: skip
            threads.append(stack.postgres.restart_after(2.0))

    gate.on_request = stop_during_s1
    config = _config(flanders, stack.api, token, ingest=ceiling)
    served = ingest(Workspace.open(config, str(tmp_path / "api")))
    for thread in threads:
        thread.join()
    s2, s1 = served.modalities["s2"], served.modalities["s1"]
    assert s2.item_ids == static.modalities["s2"].item_ids and len(s2.item_ids) > 20
    assert s1.item_ids == static.modalities["s1"].item_ids and len(s1.item_ids) > 100
    assert s2.search["cloud_filter"] == "cql2-json" and s2.search["fields"] is True
    assert s2.items_found < static.modalities["s2"].items_found  # cloudy ones never sent
    assert s1.search["cloud_filter"] == "none" and s1.search["retries"] >= 1 and threads
    _same_cubes(tmp_path / "api", tmp_path / "static")
    report = json.dumps(served.model_dump(mode="json"))
    assert TOKEN not in report
    print(f"S2 found {s2.items_found} (static {static.modalities['s2'].items_found}), "
          f"S1 retries {s1.search['retries']}, gate {dict(gate.counts)}, "
          f"asset bytes {stack.assets.counts['bytes']}")  # fmt: skip
    shutil.rmtree(tmp_path / "static", ignore_errors=True)
