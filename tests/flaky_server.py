"""A static file server on 127.0.0.1 that fails a seeded share of requests (stdlib, one thread
per connection), for the faults suite.

`serve_flaky(folder, rate=0.2, seed=0)` serves the files under `folder` (a static STAC catalogue's
JSON and COGs) with GET, HEAD and single byte ranges (`Range: bytes=a-b`, `a-`, `-n`), as GDAL's
/vsicurl/ reads COGs. A request drawn as faulty (probability `rate`, from one seeded generator)
gets one of `kinds`, in turn:

* ``503``: `503 Service Unavailable` with a `Retry-After: 0` header;
* ``reset``: the connection is closed with a TCP RST (SO_LINGER 0) before any answer;
* ``truncate``: the status and the full `Content-Length` are sent, then only part of the body,
  then the connection is closed (a short body a reader must not take for the whole);
* ``slow``: the correct answer after a delay of `slow_s` seconds (bounded, below any timeout).

The yielded `FlakyServer` has the root `url`, `counts`: a Counter of requests `served` and of
each fault kind injected, so a test can say how many faults a run went through, and `queries`:
the query strings requests carried (e.g. the tokens of signed hrefs).
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

KINDS = ("503", "reset", "truncate", "slow")
TYPES = {".json": "application/json", ".tif": "image/tiff", ".tiff": "image/tiff"}


@dataclass
class FlakyServer:
    """A running server: its root URL and what it served."""

    url: str
    counts: Counter = field(default_factory=Counter)
    queries: Counter = field(default_factory=Counter)  # query strings: signed hrefs

    @property
    def faults(self) -> int:
        return sum(v for k, v in self.counts.items() if k in KINDS)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, rate: float, seed: int, kinds: tuple[str, ...], slow_s: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.rate, self.kinds, self.slow_s = rate, kinds, slow_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.queries: Counter = Counter()
        self.turn = 0

    def draw(self, query: str) -> str | None:
        """The fault of the next request, or None (seeded; one lock for all threads)."""
        with self.lock:
            self.counts["served"] += 1
            self.queries[query] += bool(query)
            if not self.kinds or self.rng.random() >= self.rate:
                return None
            kind = self.kinds[self.turn % len(self.kinds)]
            self.turn += 1
            self.counts[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server: readers reuse connections
    timeout = 30
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        local = self._local()
        fault = self.server.draw(urlsplit(self.path).query)
        if fault == "reset":
            self._reset()
            return
        if fault == "503":
            self._status(HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": "0"})
            return
        if fault == "slow":
            time.sleep(self.server.slow_s)
        if local is None:
            self._status(HTTPStatus.NOT_FOUND)
            return
        self._send_file(local, head, truncate=fault == "truncate")

    def _local(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.server.root / rel).resolve()
        inside = path.is_relative_to(self.server.root)
        return path if inside and path.is_file() else None

    def _status(self, status: HTTPStatus, headers: dict | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with RST: the client sees 'connection reset by peer'."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _range(self, size: int) -> tuple[int, int] | None:
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not match or not (match[1] or match[2]):
            return None
        if match[1]:
            start = int(match[1])
            return start, min(int(match[2]), size - 1) if match[2] else size - 1
        return max(0, size - int(match[2])), size - 1

    def _send_file(self, local: Path, head: bool, truncate: bool) -> None:
        size = local.stat().st_size
        span = self._range(size)
        start, end = span or (0, size - 1)
        if span and (start >= size or start > end):
            self._status(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})  # fmt: skip
            return
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        self.send_header("Content-Type", TYPES.get(local.suffix, "application/octet-stream"))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        with open(local, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        if truncate:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)
            return
        self.wfile.write(data)


@contextmanager
def serve_flaky(
    folder: Path,
    rate: float = 0.2,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
    slow_s: float = 0.5,
) -> Iterator[FlakyServer]:
    """Serve `folder` on 127.0.0.1 (a free port), failing a seeded `rate` of requests."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not 0 <= rate <= 1:
        raise ValueError(f"kinds must be among {KINDS} and rate in [0, 1]: {kinds}, {rate}")
    server = _Server(Path(folder), rate, seed, tuple(kinds), slow_s)
    host, port = server.server_address[:2]
    flaky = FlakyServer(f"http://{host}:{port}/", server.counts, server.queries)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="flaky", daemon=True
    )
    thread.start()
    try:
        yield flaky
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
