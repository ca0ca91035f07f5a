"""`pivotmap serve`: the published maps as a mapping centre serves them, on one port (of 127.0.0.1
unless `--host` says otherwise: `--host 0.0.0.0 --public-url URL` in a container, as the `viewer`
service of infra/compose.yaml runs it).

PostgreSQL (started here, in a data folder under the run when the server's user may write there,
else in a temporary folder) with pgstac holding every kept version; the STAC API at `/api/`,
titiler tiles at `/tiles/`, the product files at `/files/` and the MapLibre viewer at `/`.
Ctrl-C (or SIGTERM) stops the web server, then PostgreSQL, and removes the database folder and
the mosaics (VRTs) it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path


class ServeError(RuntimeError):
    """The server cannot start (port, database, catalogue)."""


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} on {host} is in use: stop what uses it or pass --port N"
                ) from None
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"pivotmap serve: {message}", file=sys.stderr, flush=True)


def _serve_folder(out: str | None, products: Path) -> Path:
    """Where the database and mosaics go: `<run>/serve` (the run folder of --out, else the
    products folder's parent)."""
    return (Path(out) if out else products.parent).resolve() / "serve"


def public_base(host: str, port: int, public_url: str | None) -> str:
    """The address users reach the server at, which the items' asset links use: `public_url`, or
    http://HOST:PORT/ (localhost when HOST is every interface, as a published container port)."""
    if public_url is None:
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{port}/"
    from urllib.parse import urlsplit

    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ServeError(
            f"--public-url {public_url!r} is not an http(s) address: give the URL users open, "
            "e.g. https://maps.example.org/ (asset links in the STAC API are made from it)"
        )
    return public_url if public_url.endswith("/") else public_url + "/"


def _run_server(app, host: str, port: int) -> None:
    """uvicorn until Ctrl-C/SIGTERM. uvicorn shuts down on either, then raises the signal again:
    SIGINT is a KeyboardInterrupt; SIGTERM (default: die at once) becomes one too, so the
    caller's `finally` stops PostgreSQL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ServeError(f"the web server did not start on {host}:{port}")


def serve(
    out: str | None = None,
    catalog: str | None = None,
    port: int = 8080,
    host: str = "127.0.0.1",
    db_port: int | None = None,
    public_url: str | None = None,
) -> dict:
    """Start PostgreSQL, load the catalogue, serve until interrupted; stop everything."""
    from pivotmap.tasks.pgstac_server import DatabaseError, Postgres, load_pgstac, missing_server
    from pivotmap.tasks.serve_app import build_app
    from pivotmap.tasks.serve_catalogue import (
        build_mosaics,
        mirror_products,
        products_folder,
        read_versions,
    )
    from pivotmap.tasks.storage import is_remote

    started = time.monotonic()
    remote = catalog is not None and is_remote(catalog)
    base = public_base(host, port, public_url)
    products = None if remote else products_folder(catalog or out or "")
    _check_port(host, port)
    mirror = Path(tempfile.mkdtemp(prefix="pivotmap-serve-")) if remote else None
    if mirror is not None:  # s3:// or http(s)://: its versions copied here, removed at the end
        try:
            products = mirror_products(str(catalog), mirror / "products")
        except BaseException:
            shutil.rmtree(mirror, ignore_errors=True)
            raise
        _say(f"{catalog} copied to {products}")
    assert products is not None
    if reason := missing_server():
        raise ServeError(f"no database for the STAC API: {reason}")
    versions = read_versions(products, base + "files/")
    folder = _serve_folder(out, products)
    pg = None
    try:
        pg = Postgres(folder / "postgres", db_port)
        where = (
            "under the run"
            if pg.in_place
            else "in a temporary folder: the run folder is closed to the server's user"
        )
        _say(f"PostgreSQL data in {pg.folder} ({where}), port {pg.port}")
        pg.start()
        load_pgstac(pg, [v.collection for v in versions], [i for v in versions for i in v.items])
        mosaics = build_mosaics(versions, folder / f"mosaics-{port}")
        title = versions[0].collection.get("title", versions[0].collection_id)
        app = build_app(versions, mosaics, products, pg.env(), title)
        n_items = sum(len(v.items) for v in versions)
        _say(
            f"{len(versions)} version(s), {n_items} items loaded in "
            f"{time.monotonic() - started:.1f} s; viewer {base}  STAC API {base}api/  "
            f"tiles {base}tiles/  (Ctrl-C stops)"
        )
        _run_server(app, host, port)
    except DatabaseError as exc:
        raise ServeError(f"the database cannot start: {exc}") from None
    finally:
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.remove()
        shutil.rmtree(folder / f"mosaics-{port}", ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty
        if mirror is not None:
            shutil.rmtree(mirror, ignore_errors=True)
    return {"url": base, "versions": [v.version for v in versions], "stopped": True}


def add_parser(sub) -> None:
    """The `pivotmap serve` subcommand (called by flows/cli.py)."""
    serve_cmd = sub.add_parser(
        "serve", help="serve the published maps: STAC API, map tiles and a web viewer"
    )
    where = serve_cmd.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a run folder (its products/ are served)")
    where.add_argument(
        "--catalog",
        help="a products folder or its catalog.json: a path, s3://bucket/prefix (every kept "
        "version) or http(s)://… (the version catalog.json links to: http lists no folders)",
    )
    serve_cmd.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    serve_cmd.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every "
        "interface, as in a container behind a published port or a proxy)",
    )
    serve_cmd.add_argument(
        "--public-url",
        default=None,
        help="the address users open (default: http://HOST:PORT/, localhost for 0.0.0.0): the "
        "asset links in the STAC API are made from it, e.g. behind a proxy",
    )
    serve_cmd.add_argument(
        "--db-port", type=int, default=None, help="PostgreSQL's port (default: a free one)"
    )
    serve_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")


def command(args) -> dict:
    return serve(
        out=args.out,
        catalog=args.catalog,
        port=args.port,
        host=args.host,
        db_port=args.db_port,
        public_url=args.public_url,
    )
