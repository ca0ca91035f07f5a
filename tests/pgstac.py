"""A real STAC API for tests: PostgreSQL + PostGIS, pgstac and stac-fastapi-pgstac on 127.0.0.1.

`pgstac_api(catalog_path, folder)` starts, in `folder`:

* PostgreSQL (Debian's server binaries, `/usr/lib/postgresql/NN/bin`) in a fresh `initdb`
  cluster on a free 127.0.0.1 port, run as the `postgres` user when the tests run as root (the
  server refuses root); trust authentication, so no password is needed;
* pgstac's schema (`pypgstac` migrations) with the catalogue's collections and items loaded,
  their relative asset hrefs made absolute URLs on an `AssetServer` (a static file server with
  HEAD and byte ranges, as GDAL's /vsicurl/ reads COGs);
* stac-fastapi-pgstac (`uvicorn stac_fastapi.pgstac.app:create_app --factory`, which reads the
  `PG*` variables and `ENABLED_EXTENSIONS`) on another free port;
* a `Gate` in front of the API: a reverse proxy that can require request headers (401 without
  them) and counts the requests and the bytes it passed, so a test can compare what a search
  transferred; `gate.on_request` can run a hook before a request is forwarded (e.g. stop the
  database on the second search page).

It yields a `PgstacStack` (the `api` URL through the gate, `direct` URL, `postgres`, `assets`,
`gate`). `skip_reason()` says why such a stack cannot run here (no PostgreSQL/PostGIS, no
pypgstac/stac-fastapi-pgstac), for a test to skip cleanly. `.ci/run` installs the Debian packages.
The cluster and the loading are `pivotmap serve`'s own (pivotmap.tasks.pgstac_server).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from pivotmap.tasks import pgstac_server
from pivotmap.tasks.pgstac_server import DB, free_port, load_pgstac, pg_bin_dir  # noqa: F401
from tests.procs import stop_group


def skip_reason() -> str | None:
    if pg_bin_dir() is None:
        return "PostgreSQL with PostGIS not installed (apt-get install postgresql postgresql-NN-postgis-3)"
    for module in ("pypgstac", "stac_fastapi.pgstac", "uvicorn", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install -e '.[test]')"
    return None


def _wait(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {timeout:g} s\n{tail}")


def _connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------- PostgreSQL


class Postgres(pgstac_server.Postgres):
    """A throw-away PostgreSQL cluster in its own temporary folder (a test's tmp_path, 0700 and
    root's, is closed to the `postgres` user), which can also be stopped and restarted later."""

    def restart_after(self, delay_s: float) -> threading.Thread:
        """Stop now; start again after `delay_s` seconds (in a thread, returned)."""
        self.stop()

        def later() -> None:
            time.sleep(delay_s)
            self.start()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread


# ---------------------------------------------------------------------------- loading


def _absolute(doc: dict, doc_path: Path, catalog_dir: Path, base_url: str) -> dict:
    """An item/collection with relative asset hrefs made URLs on the asset server."""
    out = json.loads(json.dumps(doc))
    for asset in out.get("assets", {}).values():
        href = asset["href"]
        if "://" not in href:
            rel = (doc_path.parent / href).resolve().relative_to(catalog_dir)
            asset["href"] = urljoin(base_url, rel.as_posix())
    out["links"] = [ln for ln in out.get("links", []) if "://" in ln.get("href", "")]
    return out


def load_catalogue(pg: Postgres, catalog_path: Path, asset_url: str, folder: Path) -> Counter:
    """pgstac migrations, then the static catalogue's collections and items; counts per collection."""
    catalog_dir = catalog_path.parent.resolve()
    root = json.loads(catalog_path.read_text())
    collections, items, counts = [], [], Counter()
    for link in root["links"]:
        if link["rel"] != "child":
            continue
        cpath = (catalog_dir / link["href"]).resolve()
        coll = json.loads(cpath.read_text())
        collections.append(_absolute(coll, cpath, catalog_dir, asset_url))
        for ilink in coll["links"]:
            if ilink["rel"] == "item":
                ipath = (cpath.parent / ilink["href"]).resolve()
                item = _absolute(json.loads(ipath.read_text()), ipath, catalog_dir, asset_url)
                item["collection"] = coll["id"]
                items.append(item)
                counts[coll["id"]] += 1
    load_pgstac(pg, collections, items)
    return counts


# ---------------------------------------------------------------------------- HTTP servers


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _missing_headers(self) -> bool:
        required = self.server.required  # type: ignore[attr-defined]
        if all(self.headers.get(k) == v for k, v in required.items()):
            return False
        self.server.counts["unauthorised"] += 1  # type: ignore[attr-defined]
        body = b'{"code": "Unauthorized", "description": "missing or wrong credentials"}'
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type, required: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.required = dict(required)
        self.counts: Counter[str] = Counter()


@contextlib.contextmanager
def _serving(server: _Server) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class _AssetHandler(_Quiet):
    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        if self._missing_headers():
            return
        root: Path = self.server.root  # type: ignore[attr-defined]
        local = (root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
        if root not in local.parents or not local.is_file():
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = local.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and "," not in rng:
            a, _, b = rng[6:].partition("-")
            start, end = (size - int(b), size - 1) if not a else (int(a), min(int(b or end), end))
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header(
            "Content-Type", "image/tiff" if local.suffix == ".tif" else "application/json"
        )
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.server.counts["requests"] += 1  # type: ignore[attr-defined]
        if not head:
            with local.open("rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))
            self.server.counts["bytes"] += end - start + 1  # type: ignore[attr-defined]


@dataclass
class AssetServer:
    url: str
    counts: Counter
    required: dict[str, str]


@contextlib.contextmanager
def serve_assets(root: Path, required: dict[str, str] | None = None) -> Iterator[AssetServer]:
    """Files under `root` over HTTP (HEAD, single byte ranges), optionally behind `required`
    request headers (401 without them)."""
    server = _Server(_AssetHandler, required or {})
    server.root = root.resolve()  # type: ignore[attr-defined]
    with _serving(server):
        yield AssetServer(
            f"http://127.0.0.1:{server.server_address[1]}/", server.counts, server.required
        )


class _GateHandler(_Quiet):
    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def _forward(self, method: str) -> None:
        import http.client

        gate: Gate = self.server.gate  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        gate.requests[f"{method} {path}"] += 1
        if method == "POST" and path.endswith("/search"):
            gate.search_bodies.append(json.loads(body or b"{}"))
        if self._missing_headers():
            return
        if gate.on_request is not None:
            gate.on_request(method, path, gate.requests[f"{method} {path}"])
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")
        }
        headers["Host"] = f"127.0.0.1:{self.server.server_address[1]}"  # links point at the gate
        conn = http.client.HTTPConnection("127.0.0.1", gate.upstream_port, timeout=60)
        try:
            conn.request(method, self.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except OSError:  # the API dropped the connection: drop the client's too
            gate.counts["upstream_errors"] += 1
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            conn.close()
        gate.counts[f"status {answer.status}"] += 1
        gate.counts["bytes"] += len(data)
        if path.endswith("/search") or path.endswith("/items"):
            gate.counts["search_bytes"] += len(data)
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in (
                "content-length",
                "transfer-encoding",
                "connection",
                "content-encoding",
            ):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Gate:
    """The reverse proxy in front of the API: required headers, counts and a request hook."""

    url: str
    upstream_port: int
    required: dict[str, str]
    counts: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    search_bodies: list[dict] = field(default_factory=list)
    on_request: Callable[[str, str, int], None] | None = None

    def reset(self) -> None:
        self.counts.clear()
        self.requests.clear()
        self.search_bodies.clear()
        self.on_request = None


@contextlib.contextmanager
def serve_gate(upstream_port: int, required: dict[str, str] | None = None) -> Iterator[Gate]:
    server = _Server(_GateHandler, required or {})
    gate = Gate(f"http://127.0.0.1:{server.server_address[1]}/", upstream_port, server.required)
    server.gate = gate  # type: ignore[attr-defined]
    server.counts = gate.counts
    with _serving(server):
        yield gate


# ---------------------------------------------------------------------------- the API


@contextlib.contextmanager
def serve_api(
    pg: Postgres, folder: Path, extensions: str | None = None
) -> Iterator[tuple[str, int]]:
    """stac-fastapi-pgstac under uvicorn on a free port: (root URL, port)."""
    port = free_port()
    env = {**os.environ, **pg.env(), "DB_MIN_CONN_SIZE": "1", "DB_MAX_CONN_SIZE": "4"}
    if extensions is not None:
        env["ENABLED_EXTENSIONS"] = extensions
    log = folder / f"uvicorn-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait(lambda: proc.poll() is None and _connects(port), 60, "stac-fastapi-pgstac", log)
        yield f"http://127.0.0.1:{port}/", port
    finally:
        stop_group(proc)


@dataclass
class PgstacStack:
    api: str  # through the gate
    direct: str  # the API itself
    postgres: Postgres
    assets: AssetServer
    gate: Gate
    counts: Counter  # items loaded per collection


@contextlib.contextmanager
def pgstac_api(
    catalog_path: Path,
    folder: Path,
    *,
    required_headers: dict[str, str] | None = None,
    asset_headers: dict[str, str] | None = None,
    extensions: str | None = None,
) -> Iterator[PgstacStack]:
    """The whole stack: PostgreSQL, the catalogue loaded, the API, assets over HTTP, the gate."""
    pg = Postgres()
    try:
        pg.start()
        with serve_assets(catalog_path.parent, asset_headers) as assets:
            counts = load_catalogue(pg, catalog_path, assets.url, folder)
            with serve_api(pg, folder, extensions) as (direct, port):
                with serve_gate(port, required_headers) as gate:
                    yield PgstacStack(gate.url, direct, pg, assets, gate, counts)
    finally:
        pg.remove()
