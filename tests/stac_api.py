"""A small, real STAC API server over a static catalogue, for tests (stdlib, background thread).

`serve_catalog(path)` reads a static STAC catalogue (catalog.json, child collections, their
items) and serves it on 127.0.0.1 as a STAC API that pystac-client can use unchanged:

* `/` landing page with `conformsTo` (core, item-search, collections, ogcapi-features) and the
  links pystac-client follows (`data` → /collections, `search` for GET and POST, conformance);
* `/conformance`, `/collections`, `/collections/{id}`, `/collections/{id}/items[/{item}]`;
* `/search` (GET and POST) with `collections`, `ids`, `bbox`, `intersects`, `datetime` (instant
  or interval `a/b`, open ends `..` or empty) and `limit` (default 10, so results page); the
  `next` link carries a `token` in the query for GET and in a `body` with `merge: true` for POST,
  as the STAC API spec describes and pystac-client consumes it. Results come in (datetime, id)
  order; an unknown collection in a search matches nothing (200, empty), while
  `/collections/{unknown}` is a 404.

Items keep their content; their links (self, parent, collection, root) point at the API, and
relative asset hrefs become either `file://` URIs of the local COGs (`assets="file"`, default) or
URLs on this server (`assets="http"`, `/assets/<path in the catalogue>`, served with HEAD and
byte-range GET as GDAL's /vsicurl/ reads remote COGs). Not plain absolute paths: pystac resolves a
scheme-less href against the item's http self link, so odc-stac would ask the API host for
`http://127.0.0.1:<port>/abs/path.tif`. Errors are JSON `{"code", "description"}` with 400, 404
or 405.

The yielded root URL is a `str` with a `hits` Counter of requests served, keyed `"METHOD /path"`
(query left out), e.g. `url.hits["POST /search"]`, so a test can check that paging happened.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from shapely.geometry import box, shape

STAC_VERSION = "1.0.0"
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000
CONFORMS_TO = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
# Parameters of extensions this server does not implement: refused rather than ignored, so a
# caller relying on them notices.
UNSUPPORTED = ("query", "filter", "filter-lang", "sortby", "fields", "q")
JSON = "application/json"
GEOJSON = "application/geo+json"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class ServerURL(str):
    """The root URL of a running server; `hits` counts the requests it has served."""

    hits: Counter[str]


# ---------------------------------------------------------------------------------------------
# Reading the static catalogue


def _is_url(href: str) -> bool:
    scheme = urlsplit(href).scheme
    return len(scheme) > 1  # a Windows drive letter is not a scheme


def _local(href: str, base_dir: Path) -> str:
    """An href made absolute: URLs as they are, relative paths resolved against `base_dir`."""
    if _is_url(href):
        return href
    return str((base_dir / href).resolve())


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_catalog(catalog_path: Path) -> tuple[dict, dict[str, dict], dict[str, list[dict]]]:
    """The root catalogue, its collections (by id) and each collection's items (with absolute
    asset hrefs), found through `child` and `item` links the way pystac walks them."""
    catalog_path = Path(catalog_path)
    if catalog_path.is_dir():
        catalog_path = catalog_path / "catalog.json"
    root = _read(catalog_path)
    collections: dict[str, dict] = {}
    items: dict[str, list[dict]] = {}

    def items_under(doc: dict, doc_dir: Path, collection_id: str) -> Iterator[dict]:
        for link in doc.get("links", []):
            href = link.get("href", "")
            if _is_url(href):
                continue
            path = (doc_dir / href).resolve()
            if link.get("rel") == "item":
                item = _read(path)
                for asset in item.get("assets", {}).values():
                    asset["href"] = _local(asset["href"], path.parent)
                item.setdefault("collection", collection_id)
                yield item
            elif link.get("rel") == "child":
                yield from items_under(_read(path), path.parent, collection_id)

    def walk(doc: dict, doc_dir: Path) -> None:
        for link in doc.get("links", []):
            href = link.get("href", "")
            if link.get("rel") != "child" or _is_url(href):
                continue
            path = (doc_dir / href).resolve()
            child = _read(path)
            if child.get("type") == "Collection":
                for asset in child.get("assets", {}).values():
                    asset["href"] = _local(asset["href"], path.parent)
                collections[child["id"]] = child
                items[child["id"]] = list(items_under(child, path.parent, child["id"]))
            else:
                walk(child, path.parent)

    walk(root, catalog_path.parent)
    return root, collections, items


# ---------------------------------------------------------------------------------------------
# Search


def _parse_instant(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid datetime {text!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _parse_interval(value: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """`a/b` with open ends `..` or empty, or a single instant (start == end)."""
    parts = value.split("/")
    if len(parts) == 1:
        when = _parse_instant(parts[0])
        return when, when
    if len(parts) != 2:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid datetime interval {value!r}")
    start, end = (None if p in ("", "..") else _parse_instant(p) for p in parts)
    if start is None and end is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"datetime interval {value!r} is open at both ends")
    if start is not None and end is not None and start > end:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"datetime interval {value!r} ends before it starts")
    return start, end


def _item_interval(item: dict) -> tuple[dt.datetime | None, dt.datetime | None]:
    props = item.get("properties", {})
    if props.get("datetime"):
        when = _parse_instant(props["datetime"])
        return when, when
    start, end = props.get("start_datetime"), props.get("end_datetime")
    return (_parse_instant(start) if start else None, _parse_instant(end) if end else None)


def _sort_key(item: dict) -> tuple[float, str]:
    start, _ = _item_interval(item)
    return (start.timestamp() if start else float("-inf"), item["id"])


class Query:
    """Search parameters, from a GET query string or a POST JSON body."""

    def __init__(self, params: dict[str, Any]) -> None:
        for name in UNSUPPORTED:
            if params.get(name) not in (None, "", []):
                raise ApiError(HTTPStatus.BAD_REQUEST, f"parameter {name!r} is not supported")
        self.collections = self._strings(params.get("collections"))
        self.ids = self._strings(params.get("ids"))
        self.geometry = None
        bbox, intersects = params.get("bbox"), params.get("intersects")
        if bbox not in (None, "", []) and intersects not in (None, ""):
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "only one of 'bbox' and 'intersects' may be given"
            )
        if bbox not in (None, "", []):
            self.geometry = self._bbox(bbox)
        elif intersects not in (None, ""):
            try:
                geojson = json.loads(intersects) if isinstance(intersects, str) else intersects
                self.geometry = shape(geojson)
            except Exception as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid 'intersects': {exc}") from exc
        datetime = params.get("datetime")
        self.interval = _parse_interval(datetime) if datetime else None
        try:
            limit = int(params.get("limit") or DEFAULT_LIMIT)
        except (TypeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid limit {params['limit']!r}") from exc
        if limit < 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"limit must be at least 1, got {limit}")
        self.limit = min(limit, MAX_LIMIT)
        token = params.get("token")
        try:
            self.offset = int(str(token).removeprefix("next:")) if token else 0
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid paging token {token!r}") from exc

    @staticmethod
    def _strings(value: Any) -> list[str] | None:
        if value in (None, "", []):
            return None
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ApiError(HTTPStatus.BAD_REQUEST, f"expected a list of strings, got {value!r}")

    @staticmethod
    def _bbox(value: Any):
        try:
            coords = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
        except (TypeError, ValueError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid bbox {value!r}") from exc
        if len(coords) == 6:
            coords = [coords[0], coords[1], coords[3], coords[4]]
        if len(coords) != 4:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bbox needs 4 or 6 numbers, got {value!r}")
        return box(*coords)

    def matches(self, item: dict) -> bool:
        if self.ids is not None and item["id"] not in self.ids:
            return False
        if self.collections is not None and item.get("collection") not in self.collections:
            return False
        if self.geometry is not None and item.get("geometry") is not None:
            if not shape(item["geometry"]).intersects(self.geometry):
                return False
        if self.interval is not None:
            start, end = self.interval
            item_start, item_end = _item_interval(item)
            if end is not None and item_start is not None and item_start > end:
                return False
            if start is not None and item_end is not None and item_end < start:
                return False
        return True


# ---------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: pystac-client reuses one session
    timeout = 30  # idle keep-alive connections let their thread go
    disable_nagle_algorithm = True  # else headers and body, sent apart, wait ~40 ms for an ACK
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        is_asset = path.startswith("/assets/")
        with self.server.lock:
            self.server.hits[f"{method} /assets" if is_asset else f"{method} {path}"] += 1
        if is_asset and method in ("GET", "HEAD"):
            self._send_file(unquote(path.removeprefix("/assets/")), head=method == "HEAD")
            return
        try:
            body = self._body()
            status, doc = self.server.api.handle(method, path, parts.query, body)
        except ApiError as exc:
            status, doc = exc.status, {"code": exc.status.phrase, "description": exc.description}
        except Exception as exc:  # a bug in this server: say so rather than hang up
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            doc = {"code": status.phrase, "description": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(doc).encode("utf-8")
        ctype = GEOJSON if doc.get("type") in ("Feature", "FeatureCollection") else JSON
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_file(self, rel: str, head: bool) -> None:
        """An asset file, whole or one byte range (`Range: bytes=a-b`, `a-` or `-n`)."""
        local = self.server.api.asset_files.get(rel)
        if local is None:
            data = json.dumps({"code": "Not Found", "description": f"no asset {rel!r}"}).encode()
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Type", JSON)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(b"" if head else data)
            return
        size = local.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match[1] or match[2]):
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:
                start = max(0, size - int(match[2]))
            status = HTTPStatus.PARTIAL_CONTENT
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            with open(local, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {exc}") from exc


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: _Api) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.api = api
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()


class _Api:
    """The STAC API documents, built on the static catalogue; `base` is the root URL."""

    def __init__(self, catalog_path: Path, assets: str = "file", claims: tuple = ()) -> None:
        self.conforms = CONFORMS_TO + list(claims)
        if assets not in ("file", "http"):
            raise ValueError(f"assets must be 'file' or 'http', not {assets!r}")
        catalog_path = Path(catalog_path)
        if catalog_path.is_dir():
            catalog_path = catalog_path / "catalog.json"
        self.root, self.collections, self.items = _load_catalog(catalog_path)
        self.all_items = sorted((i for v in self.items.values() for i in v), key=_sort_key)
        self.assets = assets
        self.base = ""
        # Files the server may send: local assets under the catalogue folder, by relative path.
        top = catalog_path.parent.resolve()
        self.asset_files: dict[str, Path] = {}
        for item in self.all_items:
            for asset in item.get("assets", {}).values():
                local = Path(asset["href"])
                if not _is_url(asset["href"]) and local.is_relative_to(top):
                    self.asset_files[local.relative_to(top).as_posix()] = local
        self._rel = {str(local): rel for rel, local in self.asset_files.items()}

    # -- URLs and documents ---------------------------------------------------------------------
    def url(self, path: str = "") -> str:
        return self.base + path.lstrip("/")

    def collection_url(self, cid: str) -> str:
        return self.url(f"collections/{quote(cid)}")

    def _collection_doc(self, cid: str) -> dict:
        doc = dict(self.collections[cid])
        kept = [lk for lk in doc.get("links", []) if _is_url(lk.get("href", ""))]
        kept = [lk for lk in kept if lk.get("rel") not in ("self", "root", "parent", "items")]
        doc["links"] = [
            {"rel": "self", "href": self.collection_url(cid), "type": JSON},
            {"rel": "root", "href": self.url(), "type": JSON},
            {"rel": "parent", "href": self.url(), "type": JSON},
            {"rel": "items", "href": self.collection_url(cid) + "/items", "type": GEOJSON},
            *kept,
        ]
        return doc

    def _asset_href(self, href: str) -> str:
        if _is_url(href):
            return href
        if self.assets == "http" and href in self._rel:
            return self.url("assets/" + quote(self._rel[href]))
        return Path(href).as_uri()

    def _item_doc(self, item: dict) -> dict:
        doc = dict(item)
        doc["assets"] = {
            key: {**asset, "href": self._asset_href(asset["href"])}
            for key, asset in item.get("assets", {}).items()
        }
        cid = item["collection"]
        kept = [lk for lk in item.get("links", []) if _is_url(lk.get("href", ""))]
        kept = [lk for lk in kept if lk.get("rel") not in ("self", "root", "parent", "collection")]
        doc["links"] = [
            {
                "rel": "self",
                "href": self.collection_url(cid) + f"/items/{quote(item['id'])}",
                "type": GEOJSON,
            },
            {"rel": "parent", "href": self.collection_url(cid), "type": JSON},
            {"rel": "collection", "href": self.collection_url(cid), "type": JSON},
            {"rel": "root", "href": self.url(), "type": JSON},
            *kept,
        ]
        return doc

    def landing(self) -> dict:
        children = [
            {
                "rel": "child",
                "href": self.collection_url(cid),
                "type": JSON,
                "title": c.get("title"),
            }
            for cid, c in self.collections.items()
        ]
        return {
            "type": "Catalog",
            "id": self.root.get("id", "stac-api"),
            "title": self.root.get("title", ""),
            "description": self.root.get("description", "STAC API over a static catalogue"),
            "stac_version": STAC_VERSION,
            "conformsTo": self.conforms,
            "links": [
                {"rel": "self", "href": self.url(), "type": JSON},
                {"rel": "root", "href": self.url(), "type": JSON},
                {"rel": "data", "href": self.url("collections"), "type": JSON},
                {"rel": "conformance", "href": self.url("conformance"), "type": JSON},
                {"rel": "search", "href": self.url("search"), "type": GEOJSON, "method": "GET"},
                {"rel": "search", "href": self.url("search"), "type": GEOJSON, "method": "POST"},
                *children,
            ],
        }

    # -- routing --------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: str, body: Any) -> tuple[HTTPStatus, dict]:
        segments = [s for s in path.split("/") if s]
        ok = HTTPStatus.OK
        if path == "/search":
            if method == "GET":
                return ok, self.search_get(query)
            if method == "POST":
                return ok, self.search_post(body)
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on /search")
        if method != "GET":
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")
        if not segments:
            return ok, self.landing()
        if segments == ["conformance"]:
            return ok, {"conformsTo": self.conforms}
        if segments[0] == "collections":
            if len(segments) == 1:
                return ok, {
                    "collections": [self._collection_doc(cid) for cid in self.collections],
                    "links": [
                        {"rel": "self", "href": self.url("collections"), "type": JSON},
                        {"rel": "root", "href": self.url(), "type": JSON},
                    ],
                }
            cid = segments[1]
            if cid not in self.collections:
                raise ApiError(HTTPStatus.NOT_FOUND, f"collection {cid!r} not found")
            if len(segments) == 2:
                return ok, self._collection_doc(cid)
            if segments[2] == "items" and len(segments) == 3:
                return ok, self.collection_items(cid, query)
            if segments[2] == "items" and len(segments) == 4:
                for item in self.items[cid]:
                    if item["id"] == segments[3]:
                        return ok, self._item_doc(item)
                raise ApiError(HTTPStatus.NOT_FOUND, f"item {segments[3]!r} not in {cid!r}")
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    # -- item lists -----------------------------------------------------------------------------
    def _page(self, q: Query, candidates: list[dict]) -> tuple[dict, int | None]:
        matched = [it for it in candidates if q.matches(it)]
        page = matched[q.offset : q.offset + q.limit]
        next_offset = q.offset + q.limit if q.offset + q.limit < len(matched) else None
        doc = {
            "type": "FeatureCollection",
            "features": [self._item_doc(it) for it in page],
            "numberMatched": len(matched),
            "numberReturned": len(page),
            "links": [{"rel": "root", "href": self.url(), "type": JSON}],
        }
        return doc, next_offset

    @staticmethod
    def _get_params(query: str) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def _next_get(self, doc: dict, path: str, params: dict, next_offset: int | None) -> dict:
        if next_offset is not None:
            href = self.url(path) + "?" + urlencode({**params, "token": f"next:{next_offset}"})
            doc["links"].append({"rel": "next", "href": href, "type": GEOJSON, "method": "GET"})
        return doc

    def search_get(self, query: str) -> dict:
        params = self._get_params(query)
        q = Query(params)
        doc, next_offset = self._page(q, self.all_items)
        doc["links"].insert(0, {"rel": "self", "href": self.url("search") + "?" + query})
        return self._next_get(doc, "search", params, next_offset)

    def search_post(self, body: Any) -> dict:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "search body must be a JSON object")
        q = Query(body)
        doc, next_offset = self._page(q, self.all_items)
        if next_offset is not None:
            doc["links"].append(
                {
                    "rel": "next",
                    "href": self.url("search"),
                    "type": GEOJSON,
                    "method": "POST",
                    "body": {"token": f"next:{next_offset}"},
                    "merge": True,
                }
            )
        return doc

    def collection_items(self, cid: str, query: str) -> dict:
        params = self._get_params(query)
        for name in ("collections", "ids", "intersects"):
            params.pop(name, None)
        q = Query(params)
        doc, next_offset = self._page(q, self.items[cid])
        path = f"collections/{quote(cid)}/items"
        doc["links"].insert(0, {"rel": "self", "href": self.url(path), "type": GEOJSON})
        doc["links"].append({"rel": "collection", "href": self.collection_url(cid), "type": JSON})
        return self._next_get(doc, path, params, next_offset)


@contextmanager
def serve_catalog(
    catalog_path: Path, assets: str = "file", claims: tuple[str, ...] = ()
) -> Iterator[ServerURL]:
    """Serve the static catalogue at `catalog_path` (catalog.json or its folder) as a STAC API.

    `assets`: "file" gives items `file://` asset hrefs, "http" serves the COGs from this server.
    `claims`: conformance classes announced but not implemented (their parameters still get a
    400), as a misdescribed API would.
    Yields the root URL (`http://127.0.0.1:<port>/`), a str whose `hits` counts requests.
    """
    api = _Api(Path(catalog_path), assets, claims)
    server = _Server(api)
    host, port = server.server_address[:2]
    url = ServerURL(f"http://{host}:{port}/")
    url.hits = server.hits
    api.base = str(url)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="stac-api", daemon=True
    )
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
