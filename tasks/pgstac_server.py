"""A PostgreSQL + PostGIS cluster with pgstac, started and stopped by pivotmap on 127.0.0.1.

`Postgres(folder)` runs Debian's server binaries (`/usr/lib/postgresql/NN/bin`, the newest with
PostGIS beside it) in a fresh `initdb` cluster with trust authentication on loopback, as the
`postgres` user when pivotmap runs as root (the server refuses root). `load_pgstac` applies
pgstac's migrations (`pypgstac`) and loads collections and items. Used by `pivotmap serve` and by
the tests' STAC API (tests/pgstac.py).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DB = "pivotmap"


class DatabaseError(RuntimeError):
    """PostgreSQL cannot be set up or started."""


def pg_bin_dir(postgis: bool = True) -> Path | None:
    """The newest Debian PostgreSQL server binaries (`initdb`, `pg_ctl`), with PostGIS installed
    beside them unless `postgis` is False (the stack's Prefect and MLflow databases)."""
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        version = Path(bindir).parent.name
        if not (Path(bindir, "initdb").is_file() and Path(bindir, "pg_ctl").is_file()):
            continue
        if not postgis or glob.glob(f"/usr/share/postgresql/{version}/extension/postgis.control"):
            return Path(bindir)
    return None


def _version(bindir: str) -> tuple[int, ...]:
    """(15,) of /usr/lib/postgresql/15/bin: 15 sorts above 9."""
    return tuple(int(p) for p in Path(bindir).parent.name.split(".") if p.isdigit())


def missing_server() -> str | None:
    """Why a pgstac database cannot run here (None when it can)."""
    if pg_bin_dir() is None:
        return (
            "PostgreSQL with PostGIS is not installed "
            "(apt-get install postgresql postgresql-NN-postgis-3)"
        )
    for module in ("pypgstac", "stac_fastapi.pgstac", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e .)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _server_user() -> tuple[str, list[str]]:
    """The database user and the command prefix that runs the server binaries as it."""
    if os.geteuid() == 0:  # the server refuses to run as root
        return "postgres", ["runuser", "-u", "postgres", "--"]
    import getpass

    return getpass.getuser(), []


def data_folder(preferred: Path | None) -> tuple[Path, bool]:
    """A folder for the cluster: `preferred` when the server's user can write there, else a new
    temporary folder (a root-owned 0700 folder is closed to `postgres`). Returns (folder, whether
    it is `preferred`)."""
    _, as_user = _server_user()
    if preferred is not None:
        with contextlib.suppress(OSError):
            preferred.mkdir(parents=True, exist_ok=True)
            if as_user:
                shutil.chown(preferred, "postgres")
                probe = subprocess.run([*as_user, "test", "-w", str(preferred)], check=False)
                if probe.returncode == 0:
                    return preferred, True
                preferred.rmdir()
            else:
                return preferred, True
    folder = Path(tempfile.mkdtemp(prefix="pivotmap-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    return folder, False


class Cluster:
    """A PostgreSQL cluster in `folder/pgdata` (with `postgres.log` beside it), listening on
    127.0.0.1:`port` with trust authentication, its binaries run as the server's user; `error`:
    what a failed command raises."""

    error: type[Exception] = DatabaseError

    def __init__(self, bindir: Path, folder: Path | None, port: int) -> None:
        self.bin, self.port = bindir, port
        self.user, self._as_user = _server_user()
        self.folder, self.in_place = data_folder(folder)
        self.data, self.log = self.folder / "pgdata", self.folder / "postgres.log"

    def _run(self, args: list[str]) -> None:
        # Its own session: a Ctrl-C in the terminal reaches pivotmap, which stops the server.
        done = subprocess.run(
            self._as_user + args, capture_output=True, text=True, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode:
            from pivotmap.tasks.stack_services import log_tail  # it imports this module

            tail = log_tail(self.log)
            raise self.error(
                f"PostgreSQL's {Path(args[0]).name} failed in {self.folder}: "
                f"{(done.stdout + done.stderr).strip()[-800:]}\n{tail}"
            )

    def initdb(self) -> None:
        self._run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
             "-E", "UTF8", "--no-sync"]
        )  # fmt: skip

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def pid(self) -> int | None:
        """The pid of the server running in `data` (None when there is none or it is gone)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        state = stat.rsplit(")", 1)[-1].split()[0]  # Z: exited, not yet reaped
        return pid if state != "Z" and b"postgres" in cmdline else None

    def start(self, timeout: float = 60, options: str = "") -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.folder} {options}".strip()
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-o", opts, "-w", "-t", str(int(timeout)), "start"])  # fmt: skip

    def stop(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def dsn(self, db: str = DB, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{db}"


class Postgres(Cluster):
    """A throw-away PostgreSQL cluster with PostGIS on 127.0.0.1 (`start`, `stop`, `remove`):
    initdb'd afresh, without fsync."""

    def __init__(self, folder: Path | None = None, port: int | None = None) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise DatabaseError(missing_server() or "no PostgreSQL")
        super().__init__(bindir, folder, port or free_port())
        if (pid := self.pid()) is not None:
            raise DatabaseError(
                f"a PostgreSQL server (pid {pid}) already runs in {self.data}: another "
                "`pivotmap serve` of this run? Stop it first"
            )
        shutil.rmtree(self.data, ignore_errors=True)  # left by a killed run: start afresh
        try:
            self.initdb()
        except DatabaseError:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def env(self) -> dict[str, str]:
        return {
            "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": self.user,
            "PGPASSWORD": "unused", "PGDATABASE": DB,
        }  # fmt: skip

    def start(self, timeout: float = 60, options: str = "") -> None:
        if port_in_use(self.port):
            raise DatabaseError(
                f"port {self.port} on 127.0.0.1 is in use: choose another (serve: --db-port)"
            )
        super().start(timeout, f"-c fsync=off -c full_page_writes=off {options}".strip())

    def running(self) -> bool:
        """A live server in `data` (a pid file that a killed server left does not count)."""
        return self.pid() is not None

    def remove(self) -> None:
        """Stop the server (if running) and delete its folder."""
        if self.running():
            with contextlib.suppress(DatabaseError):
                self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def create_database(pg: Postgres) -> None:
    import psycopg

    with contextlib.closing(psycopg.connect(pg.dsn("postgres"))) as conn:
        conn.autocommit = True
        conn.execute(f"CREATE DATABASE {DB}")


def load_pgstac(pg: Postgres, collections: list[dict], items: list[dict]) -> dict[str, int]:
    """A new database with pgstac's schema (migrations), holding `collections` and `items`."""
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    create_database(pg)
    with PgstacDB(dsn=pg.dsn()) as db:
        Migrate(db).run_migration()
    return sync_versions(pg.dsn(), collections, items)


def sync_versions(dsn: str, collections: list[dict], items: list[dict]) -> dict[str, int]:
    """Make a (migrated) pgstac database hold exactly these collections and their items: each
    collection upserted, its old items deleted, the given ones loaded. Publishing and rollback
    call it with every kept version (the current one under the collection's own id), so a
    search finds the current version's items under that id. Returns items per collection."""
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods

    counts = {c["id"]: 0 for c in collections}
    for item in items:
        counts[item["collection"]] += 1
    with PgstacDB(dsn=dsn) as db:
        loader = Loader(db)
        loader.load_collections(iter(collections), Methods.upsert)
        conn = db.connect()  # autocommit
        for cid in counts:
            conn.execute("DELETE FROM pgstac.items WHERE collection = %s", (cid,))
        # versions no longer kept (or now current, hence under the plain id): drop their alias
        stale = conn.execute("SELECT id FROM pgstac.collections").fetchall()
        for (cid,) in stale:
            if cid not in counts and any(cid.startswith(f"{k}_") for k in counts):
                conn.execute("SELECT pgstac.delete_collection(%s)", (cid,))
        if items:
            loader.load_items(iter(items), Methods.insert)
    return counts


def sync_products(dsn: str, products: Path, base_url: str | None = None) -> dict[str, int]:
    """`sync_versions` for a products folder: every kept version, the current one (as
    catalog.json says) under the collection's own id, asset hrefs under `base_url` (the public
    URL of `products`; default its file:// URL). For `publish` and `rollback` with a STAC API
    database (the password, if any, from PGPASSWORD: never in `dsn`)."""
    from pivotmap.tasks.serve_catalogue import read_versions

    products = Path(products).resolve()
    versions = read_versions(products, base_url or products.as_uri() + "/")
    items = [i for v in versions for i in v.items]
    return sync_versions(dsn, [v.collection for v in versions], items)


def publish_to_stac_api(dsn: str, products: Path, base_url: str | None = None) -> dict[str, int]:
    """`sync_products` into an operator's pgstac database, migrated first (pgstac's migrations
    are idempotent): what `publish.stac_api` and `rollback --stac-api` do. A database that
    cannot be reached is a `DatabaseError` naming the address (never the password)."""
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    base_url = base_url or published_base_url(products)
    try:
        with PgstacDB(dsn=dsn) as db:
            Migrate(db).run_migration()
        return sync_products(dsn, products, base_url)
    except Exception as exc:
        raise DatabaseError(
            f"STAC API database {dsn}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc


def published_base_url(products: Path) -> str | None:
    """The public URL catalog.json names as its `self` (publish writes one when
    `publish.base_url` is set), so a rollback loads the same hrefs as the publish did."""
    import json

    try:
        links = json.loads((Path(products) / "catalog.json").read_text())["links"]
    except (OSError, ValueError, KeyError):
        return None
    for link in links:
        href = link.get("href", "")
        if link.get("rel") == "self" and href.startswith(("http://", "https://")):
            return href.rsplit("/", 1)[0] + "/"
    return None
