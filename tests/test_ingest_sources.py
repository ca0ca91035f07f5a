"""Sources: `next` paging on real recorded responses, bounded retries, href modifiers, S3 catalogues,
and regions from a bbox, GeoJSON or GeoPackage."""

import datetime as dt
import json
import sqlite3
import struct
import sys
import threading
import time
import types
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pystac
import pytest
import requests
import shapely
from odc.geo.geom import box

from pivotmap.tasks.grid import GridSpec, RegionError
from pivotmap.tasks.region import geojson_region, geopackage_region, region_geometry
from pivotmap.tasks.stac_source import (
    ApiSettings,
    SourceError,
    api_io,
    load_href_modifier,
    search_items,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "stac-fixtures"
ES = "https://earth-search.aws.element84.com/v1"
PAGES = [
    "pystac-client/earthsearch_v1_search_page1_s1grd_s2l2a_s2c1l2a_s2l1c.json",
    "pystac-client/earthsearch_v1_search_page2_s2l2a_s2c1l2a_s2l1c.json",
]
START, END = dt.date(2017, 8, 1), dt.date(2017, 8, 31)
PATCH = (501360, 5629040, 502000, 5629680)


def _region():
    return box(*PATCH, "EPSG:32631").to_crs("EPSG:4326")


# ---------------------------------------------------------------------------- paging (replayed)


class _Replay(requests.adapters.BaseAdapter):
    """Answers Earth Search requests from recorded bodies; records the search bodies sent."""

    def __init__(self, pages: list[dict]) -> None:
        super().__init__()
        self.pages, self.bodies = pages, []

    def send(self, request, **kwargs):
        response = requests.Response()
        response.status_code, response.request, response.url = 200, request, request.url
        if request.url.rstrip("/") == ES:
            doc = {"type": "Catalog", "id": "earth-search-aws", "stac_version": "1.0.0",
                   "description": "replay", "conformsTo": [
                       "https://api.stacspec.org/v1.0.0/core",
                       "https://api.stacspec.org/v1.0.0/item-search"],
                   "links": [{"rel": "search", "href": f"{ES}/search", "method": "POST"}]}  # fmt: skip
        else:
            body = json.loads(request.body)
            self.bodies.append(body)
            doc = self.pages[len(self.bodies) - 1] if len(self.bodies) <= len(self.pages) else {
                "type": "FeatureCollection", "features": [], "links": []}  # fmt: skip
        response._content = json.dumps(doc).encode()
        return response

    def close(self) -> None:
        pass


def test_real_earth_search_pages_are_followed_by_their_next_links():
    if not (FIXTURES / PAGES[0]).is_file():
        pytest.skip(f"STAC fixtures not found at {FIXTURES}")
    from pystac_client import Client

    pages = [json.loads((FIXTURES / p).read_text()) for p in PAGES]
    io = api_io(ApiSettings(timeout_s=5, page_size=10))
    replay = _Replay(pages)
    io.session.mount("https://", replay)
    client = Client.open(ES, stac_io=io)
    ids = [it.id for it in client.search(collections=["sentinel-2-l2a"], limit=10).items()]
    assert ids == [f["id"] for p in pages for f in p["features"]]
    # page 2 and the (empty) page 3 are asked for with exactly the recorded `next` bodies
    assert replay.bodies[0]["limit"] == 10
    assert replay.bodies[1] == pages[0]["links"][0]["body"]
    assert replay.bodies[2] == pages[1]["links"][0]["body"]
    assert len(replay.bodies) == 3


# ---------------------------------------------------------------------------- retries


@contextmanager
def _flaky(statuses: list[int]):
    """A server answering the given statuses in turn, then a STAC landing page (200)."""
    hits: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            n = hits["GET"]
            hits["GET"] += 1
            status = statuses[n] if n < len(statuses) else 200
            doc = {"type": "Catalog", "id": "x", "stac_version": "1.0.0", "description": "d",
                   "conformsTo": [], "links": []} if status == 200 else {"code": str(status)}  # fmt: skip
            data = json.dumps(doc).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("statuses", [[503, 502], [429, 500, 504]])
def test_429_and_5xx_are_retried_with_backoff(statuses):
    from pivotmap.tasks.stac_source import open_api

    with _flaky(statuses) as (url, hits):
        t0 = time.monotonic()
        client = open_api(url, ApiSettings(timeout_s=5, max_retries=3, backoff_s=0.05))
        assert client.id == "x" and hits["GET"] == len(statuses) + 1
    assert time.monotonic() - t0 < 3


def test_retries_are_bounded_and_other_4xx_not_retried():
    from pivotmap.tasks.stac_source import open_api

    with _flaky([500] * 10) as (url, hits):
        with pytest.raises(
            SourceError, match=rf"cannot open STAC API {url}: HTTP 500.*after 2 retries"
        ):
            open_api(url, ApiSettings(timeout_s=5, max_retries=2, backoff_s=0.01))
        assert hits["GET"] == 3
    with _flaky([404]) as (url, hits):
        with pytest.raises(SourceError, match="HTTP 404"):
            open_api(url, ApiSettings(timeout_s=5, max_retries=3, backoff_s=0.01))
        assert hits["GET"] == 1


# ---------------------------------------------------------------------------- href modifier


def sign(item: pystac.Item) -> pystac.Item:
    """A stand-in for planetary_computer.sign_inplace: appends a token to every href."""
    for asset in item.assets.values():
        asset.href = asset.get_absolute_href() + "?token=abc"
    return item


def test_href_modifier_is_pluggable_and_off_by_default(flanders, monkeypatch):
    monkeypatch.setitem(sys.modules, "signing_plugin", types.SimpleNamespace(sign=sign))
    url = str(flanders / "catalog.json")
    plain = search_items("static", url, "sentinel-2-l2a", _region(), START, END)
    assert load_href_modifier(None) is None
    signed = search_items(
        "static", url, "sentinel-2-l2a", _region(), START, END,
        href_modifier=load_href_modifier("signing_plugin:sign"),
    )  # fmt: skip
    assert [i.id for i in signed] == [i.id for i in plain] and plain
    assert all(a.href.endswith("?token=abc") for i in signed for a in i.assets.values())
    assert not any("token" in a.href for i in plain for a in i.assets.values())
    with pytest.raises(SourceError, match="href modifier 'nowhere:sign' cannot be imported"):
        load_href_modifier("nowhere:sign")


# ---------------------------------------------------------------------------- S3 catalogue


@pytest.fixture
def s3_flanders(flanders, monkeypatch):
    """The Flanders catalogue (COGs of August 2017 S2 only) in a bucket on a moto S3 server."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="stac")
    for path in flanders.rglob("*"):
        rel = path.relative_to(flanders).as_posix()
        if path.is_file() and (
            path.suffix == ".json" and "labels" not in rel or "/S2X_31UDS_201708" in f"/{rel}"
        ):
            s3.upload_file(str(path), "stac", rel)
    yield "s3://stac/catalog.json"
    server.stop()


def test_static_catalogue_on_s3_searches_and_reads_like_local(s3_flanders, flanders):
    from pivotmap.tasks.load import load_dates
    from pivotmap.tasks.storage import gdal_env

    on_s3 = search_items("static", s3_flanders, "sentinel-2-l2a", _region(), START, END)
    local = search_items(
        "static", str(flanders / "catalog.json"), "sentinel-2-l2a", _region(), START, END
    )
    assert [i.id for i in on_s3] == [i.id for i in local] and len(on_s3) == 4
    assert on_s3[0].assets["red"].get_absolute_href().startswith("s3://stac/sentinel-2-l2a/")
    env = gdal_env()
    assert env["AWS_VIRTUAL_HOSTING"] == "FALSE" and env["AWS_HTTPS"] == "NO"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # secrets stay in each worker's environment
    grid = GridSpec("EPSG:32631", 10, 64, 501360, 5629040)
    geobox = grid.tile(0, 0).geobox
    a = load_dates(on_s3, geobox, "s2", scl_mask=(3, 8, 9, 10), env=env)
    b = load_dates(local, geobox, "s2", scl_mask=(3, 8, 9, 10))
    assert a.attrs["failed_items"] == [] and a.B04.notnull().sum() > 1000
    assert a.B04.equals(b.B04)
    with pytest.raises(SourceError, match="STAC catalogue not found: s3://stac/nothing.json"):
        search_items("static", "s3://stac/nothing.json", "sentinel-2-l2a", _region(), START, END)


# ---------------------------------------------------------------------------- regions

OUTLINE = shapely.Polygon([(3.0, 50.80), (3.05, 50.80), (3.05, 50.83), (3.0, 50.80)])


def _write_gpkg(path: Path, geom: shapely.Geometry, epsg: int = 4326) -> None:
    """A minimal GeoPackage (one layer, one feature), written with sqlite3 as GDAL would."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER PRIMARY KEY,
            organization TEXT, organization_coordsys_id INTEGER, definition TEXT, description TEXT);
        CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT, identifier TEXT,
            description TEXT, last_change TEXT, min_x REAL, min_y REAL, max_x REAL, max_y REAL,
            srs_id INTEGER);
        CREATE TABLE gpkg_geometry_columns (table_name TEXT, column_name TEXT,
            geometry_type_name TEXT, srs_id INTEGER, z INTEGER, m INTEGER);
        CREATE TABLE country (fid INTEGER PRIMARY KEY, geom BLOB, name TEXT);
    """)  # fmt: skip
    con.execute("INSERT INTO gpkg_spatial_ref_sys VALUES ('WGS 84', ?, 'EPSG', ?, 'x', '')",
                (epsg, epsg))  # fmt: skip
    con.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, srs_id) VALUES ('country', 'features', ?)",
        (epsg,),
    )
    con.execute(
        "INSERT INTO gpkg_geometry_columns VALUES ('country', 'geom', 'POLYGON', ?, 0, 0)", (epsg,)
    )
    x0, y0, x1, y1 = geom.bounds
    # header: magic, version 0, flags (little-endian, xy envelope), srs_id, envelope
    header = b"GP\x00\x03" + struct.pack("<i4d", epsg, x0, x1, y0, y1)
    con.execute(
        "INSERT INTO country (geom, name) VALUES (?, 'Flandria')",
        (header + shapely.to_wkb(geom),),
    )
    con.commit()
    con.close()


def test_region_from_bbox_geojson_and_geopackage_give_the_same_tiles(tmp_path):
    grid = GridSpec("EPSG:32631", 10, 256, 500000, 5620000)
    gj = tmp_path / "country.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(OUTLINE)}]}))  # fmt: skip
    gpkg = tmp_path / "country.gpkg"
    _write_gpkg(gpkg, OUTLINE)
    from_json = grid.tiles_for_geometry(geojson_region(gj))
    from_gpkg = grid.tiles_for_geometry(geopackage_region(gpkg))
    from_box = grid.tiles_for_geometry(region_geometry(bbox=OUTLINE.bounds, crs="EPSG:4326"))
    assert [t.id for t in from_json] == [t.id for t in from_gpkg]
    # the outline is a triangle: fewer tiles than its bounding box, all inside the box's
    assert 0 < len(from_json) < len(from_box)
    assert {t.id for t in from_json} <= {t.id for t in from_box}


def test_region_errors_name_the_input(tmp_path):
    with pytest.raises(RegionError, match="region GeoPackage not found: .*none.gpkg"):
        geopackage_region(tmp_path / "none.gpkg")
    gpkg = tmp_path / "c.gpkg"
    _write_gpkg(gpkg, OUTLINE)
    with pytest.raises(RegionError, match=r"no feature layer 'roads' \(layers: \['country'\]\)"):
        geopackage_region(gpkg, layer="roads")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(RegionError, match="cannot read region GeoJSON .*bad.geojson"):
        geojson_region(bad)
    eea = GridSpec("EPSG:3035", 10, 1000, 0, 0, extent=(900000, 900000, 7400000, 5500000))
    with pytest.raises(RegionError, match="outside the grid's valid extent"):
        eea.tiles_for_geometry(region_geometry(bbox=(-80, 10, -79, 11), crs="EPSG:4326"))


# ---------------------------------------------------------------------------- issue 20


@contextmanager
def _paged_api(pages: list[list[dict]]):
    """A minimal STAC API answering POST /search with the given pages of real items (a `next`
    token in the body), and recording the headers of every request."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, doc: dict) -> None:
            data = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append(dict(self.headers))
            root = f"http://127.0.0.1:{self.server.server_address[1]}/"
            if self.path == "/":
                self._send({"type": "Catalog", "id": "paged", "stac_version": "1.0.0",
                            "description": "d", "conformsTo": [
                                "https://api.stacspec.org/v1.0.0/core",
                                "https://api.stacspec.org/v1.0.0/collections",
                                "https://api.stacspec.org/v1.0.0/item-search"],
                            "links": [{"rel": "search", "href": root + "search", "method": "POST"},
                                      {"rel": "data", "href": root + "collections"}]})  # fmt: skip
            else:
                self._send({"type": "Collection", "id": "sentinel-2-l2a", "stac_version": "1.0.0",
                            "description": "d", "license": "proprietary", "links": [],
                            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                       "temporal": {"interval": [[None, None]]}}})  # fmt: skip

        def do_POST(self):
            seen.append(dict(self.headers))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = int(body.get("token", 0))
            root = f"http://127.0.0.1:{self.server.server_address[1]}/"
            links = [{"rel": "next", "href": root + "search", "method": "POST",
                      "body": {**body, "token": str(n + 1)}}] if n + 1 < len(pages) else []  # fmt: skip
            self._send({"type": "FeatureCollection", "features": pages[n], "links": links})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()


def test_ids_repeated_across_pages_are_kept_once_and_headers_stay_on_the_api_host():
    """Real Planetary Computer items, pages overlapping by 5 (a live catalogue shifting under the
    search): every id once. The header goes to the API's host, not to another."""
    path = FIXTURES / "pystac-client" / "pc_sentinel-2-l2a_search_2019-01-01_33items.json"
    if not path.is_file():
        pytest.skip(f"STAC fixtures not found at {FIXTURES}")
    from pivotmap.tasks.stac_source import find_items

    features = json.loads(path.read_text())["features"]
    bounds = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in features]).bounds
    region = box(*bounds, "EPSG:4326")
    day = dt.date(2019, 1, 1)
    api = ApiSettings(timeout_s=5, headers={"X-Api-Key": "k-123"})
    with _paged_api([features[:20], features[15:]]) as (url, seen):
        found = find_items("api", url, "sentinel-2-l2a", region, day, day, api=api)
        with _paged_api([[]]) as (other, other_seen):
            from pivotmap.tasks.stac_source import api_io

            io = api_io(api, url=url)
            io.request(url), io.request(other)
    assert found.info["items_received"] == 38 and found.info["duplicates"] == 5
    assert sorted(i.id for i in found.items) == sorted(f["id"] for f in features)
    assert found.info["cloud_filter"] == "none" and found.info["fields"] is False
    assert all(h.get("X-Api-Key") == "k-123" for h in seen) and len(seen) >= 4
    assert other_seen and not any("X-Api-Key" in h for h in other_seen)
    assert "k-123" not in repr(api)


def test_page_size_is_validated_with_the_reason():
    from pivotmap.config import SourceConfig

    with pytest.raises(ValueError, match=r"page_size\n.*20000 is outside 1..10000: the STAC API"):
        SourceConfig(kind="api", url="http://x/", page_size=20000)
    with pytest.raises(ValueError, match="0 is outside 1..10000"):
        SourceConfig(kind="api", url="http://x/", page_size=0)
    assert SourceConfig(kind="api", url="http://x/", page_size=None).page_size is None
    with pytest.raises(SourceError, match=r"page size 10001 is outside 1..10000.*source.page_size"):
        ApiSettings(page_size=10001)


def test_urls_that_are_not_an_api_root_say_what_to_give():
    with pytest.raises(
        SourceError, match=r"item-search endpoint.*landing page \(e.g. http://h/v1/\)"
    ):
        search_items("api", "http://h/v1/search", "s", _region(), START, END)
    with pytest.raises(
        SourceError, match=r"collection 's2' of a STAC API.*\(http://h/v1/\).*s2_collection"
    ):
        search_items("api", "http://h/v1/collections/s2/items", "s", _region(), START, END)


def test_transient_faults_are_retried_and_counted():
    from pivotmap.tasks.stac_source import RequestStats, open_api

    with _flaky([503, 500, 502]) as (url, hits):
        stats = RequestStats()
        open_api(url, ApiSettings(timeout_s=5, max_retries=3, backoff_s=0.01), stats)
    assert stats.retries == 3 and stats.requests == 1 and hits["GET"] == 4


def test_headers_come_from_the_environment_and_reach_gdal(monkeypatch):
    from pivotmap.config import SourceConfig
    from pivotmap.tasks.stac_source import asset_headers, request_headers
    from pivotmap.tasks.storage import gdal_env

    source = SourceConfig(kind="api", url="http://x/", bearer_token_env="T_TOKEN",
                          headers_env={"X-Key": "T_KEY"})  # fmt: skip
    with pytest.raises(SourceError, match="environment variable T_KEY"):
        request_headers(source)
    monkeypatch.setenv("T_TOKEN", "abc")
    monkeypatch.setenv("T_KEY", 'k,"1"')
    assert request_headers(source) == {"X-Key": 'k,"1"', "Authorization": "Bearer abc"}
    env = gdal_env(headers=asset_headers(source))
    assert env["GDAL_HTTP_HEADERS"] == '"X-Key: k,\\"1\\"","Authorization: Bearer abc"'
    off = source.model_copy(update={"asset_headers": False})
    assert "GDAL_HTTP_HEADERS" not in gdal_env(headers=asset_headers(off))
    with pytest.raises(ValueError, match="not an environment variable name"):
        SourceConfig(kind="api", url="http://x/", bearer_token_env="Bearer abc")


def test_intersects_ring_is_counter_clockwise():
    from pivotmap.tasks.stac_source import ccw_geojson

    clockwise = shapely.geometry.Polygon([(0, 0), (0, 1), (1, 1), (1, 0)])
    assert not clockwise.exterior.is_ccw
    from odc.geo.geom import Geometry

    ring = ccw_geojson(Geometry(clockwise, "EPSG:4326"))["coordinates"][0]
    assert shapely.geometry.LinearRing(ring).is_ccw
