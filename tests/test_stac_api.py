"""`search_items("api", ...)` against the home-made STAC API server over the Flanders catalogue.

The main API tests run against a real one (stac-fastapi-pgstac on PostgreSQL: test_pgstac_api.py);
this small server (tests/stac_api.py) stays for what only it can do: pages of exactly 10, `file://`
asset hrefs, hosts that refuse or never answer, and extensions announced but refused. Results must
match the static catalogue read directly, item for item and pixel for pixel.
"""

import datetime as dt
import math
import socket
import time
from contextlib import nullcontext

import numpy as np
import pytest
import requests
from odc.geo.geom import box

from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.load import load_s2
from pivotmap.tasks.stac_source import SourceError, search_items
from tests.stac_api import serve_catalog

PATCH = (501360, 5629040, 502000, 5629680)
START, END = dt.date(2017, 8, 1), dt.date(2018, 11, 30)


def _region():
    return box(*PATCH, "EPSG:32631").to_crs("EPSG:4326")


@pytest.fixture(scope="module")
def api(flanders):
    with serve_catalog(flanders) as url:
        yield url


def _ids(items):
    return [it.id for it in items]


@pytest.mark.parametrize(
    ("collection", "n_items"), [("sentinel-2-l2a", 118), ("sentinel-1-rtc", 159)]
)
def test_api_search_matches_static_catalogue_and_pages(api, flanders, collection, n_items):
    static_url = str(flanders / "catalog.json")
    for start, end in [(START, END), (dt.date(2017, 9, 1), dt.date(2017, 9, 30))]:
        static = search_items("static", static_url, collection, _region(), start, end)
        before = api.hits["POST /search"]
        found = search_items("api", api, collection, _region(), start, end, timeout_s=10)
        pages = api.hits["POST /search"] - before
        assert _ids(found) == _ids(static), (collection, start, end)
        assert pages == max(1, math.ceil(len(static) / 10)), pages
        if (start, end) == (START, END):
            assert len(found) == n_items and pages > 5  # paging did happen
        else:
            assert 0 < len(found) < n_items and all(it.datetime.month == 9 for it in found)
    far = box(10.0, 45.0, 10.1, 45.1, "EPSG:4326")
    assert search_items("api", api, collection, far, START, END) == []


def test_server_get_paging_and_collection_items(api):
    """The server's GET search and /collections/{id}/items page the same way as POST."""
    from pystac_client import Client

    client = Client.open(api)
    kwargs = dict(collections=["sentinel-2-l2a"], bbox=list(_region().boundingbox))
    post = _ids(client.search(method="POST", **kwargs).items())
    get = _ids(client.search(method="GET", **kwargs).items())
    assert post == get and len(post) == 118
    before = api.hits["GET /collections/sentinel-1-rtc/items"]
    assert len(list(client.get_collection("sentinel-1-rtc").get_items())) == 159
    assert api.hits["GET /collections/sentinel-1-rtc/items"] - before == 16
    missing = requests.get(api + "collections/landsat-c2-l2", timeout=5)
    assert missing.status_code == 404 and "landsat-c2-l2" in missing.json()["description"]
    bad = requests.post(api + "search", json={"datetime": "2018-13-01/.."}, timeout=5)
    assert bad.status_code == 400 and bad.json()["code"] == "Bad Request"


def test_unknown_collection_is_named(api):
    # pystac-client's Client.get_collection answers a 404 with None rather than an error, so
    # search_items must check for None to raise here.
    with pytest.raises(SourceError, match="'landsat-c2-l2'"):
        search_items("api", api, "landsat-c2-l2", _region(), START, END, timeout_s=10)


def test_unreachable_api_fails_fast_with_the_url():
    # A bound socket that does not listen: connections are refused, and no other process can take
    # the port meanwhile (a port closed before the test could be reused by a server elsewhere).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=f"cannot open STAC API {url}"):
            search_items("api", url, "sentinel-2-l2a", _region(), START, END, timeout_s=2)
        # Connection refused: pystac-client's 5 retries have no backoff, so this is immediate.
        assert time.monotonic() - t0 < 5


def test_silent_api_is_bounded_by_retries_times_timeout():
    """A host that accepts but never answers costs about (1 + 5 retries) x timeout_s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        t0 = time.monotonic()
        with pytest.raises(SourceError, match=f"cannot open STAC API {url}"):
            search_items("api", url, "sentinel-2-l2a", _region(), START, END, timeout_s=0.2)
        elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 6 * 2 * 0.2 + 2, elapsed


@pytest.mark.parametrize("assets", ["file", "http"])
def test_api_items_load_like_static_items(api, flanders, assets):
    """COGs named by `file://` URIs, or read over HTTP range requests, give the same cube."""
    grid = GridSpec(
        crs="EPSG:32631", resolution=10, tile_size=64, origin_x=501360, origin_y=5629040
    )
    (tile,) = grid.tiles_for_bbox(PATCH, "EPSG:32631")
    start, end = dt.date(2017, 8, 1), dt.date(2017, 9, 30)
    static_url = str(flanders / "catalog.json")
    static = search_items("static", static_url, "sentinel-2-l2a", _region(), start, end)
    mask = (0, 1, 3, 8, 9, 10)
    with serve_catalog(flanders, assets=assets) if assets == "http" else nullcontext(api) as url:
        served = search_items("api", url, "sentinel-2-l2a", _region(), start, end, timeout_s=10)
        assert _ids(served) == _ids(static) and len(served) > 3
        scheme = "file:///" if assets == "file" else url
        assert all(it.assets["red"].get_absolute_href().startswith(scheme) for it in served)
        a = load_s2(served, tile.geobox, mask)
        assert (url.hits["GET /assets"] > 0) == (assets == "http")
    b = load_s2(static, tile.geobox, mask)
    assert list(a.data_vars) == list(b.data_vars) and (a.time.values == b.time.values).all()
    for var in a.data_vars:
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert np.isfinite(a.B04.values).sum() > 1000


def test_filter_announced_but_refused_falls_back_to_the_client(flanders):
    """An API that announces the filter and fields extensions but answers 400 to them: the
    search is made again without, and the report says the cloud filter ran here."""
    from pivotmap.tasks.stac_source import ApiSettings, find_items

    claims = ("https://api.stacspec.org/v1.0.0-rc.2/item-search#filter",
              "https://api.stacspec.org/v1.0.0/item-search#fields")  # fmt: skip
    with serve_catalog(flanders, claims=claims) as url:
        found = find_items("api", url, "sentinel-2-l2a", _region(), START, END,
                           api=ApiSettings(timeout_s=10), max_cloud_cover=30)  # fmt: skip
        assert url.hits["POST /search"] == 1 + 12  # refused once, then 118 items, pages of 10
    assert found.info["cloud_filter"] == "client" and found.info["fields"] is False
    assert "HTTP 400" in found.info["server_refused"] and len(found.items) == 118
