"""`pivotmap serve` bad input, each one clear line and nothing left running, and the pieces it is
built from (catalogue reading, VRT mosaics, viewer configuration) on a small published folder.

The browser, API and Ctrl-C checks on a real demo run are in test_viewer.py (slow).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from pivotmap.tasks import pgstac_server
from pivotmap.tasks.serve_catalogue import (
    CatalogueError,
    products_folder,
    read_versions,
    write_vrt,
)

PIVOTMAP = str(Path(sys.executable).with_name("pivotmap"))
PALETTE = {1: (230, 194, 41, 255), 2: (31, 119, 180, 255)}


def _cog(path: Path, left: float, top: float, codes: np.ndarray, palette: bool) -> None:
    profile = dict(
        driver="GTiff", width=codes.shape[1], height=codes.shape[0], count=1, dtype="uint8",
        crs="EPSG:32631", transform=from_origin(left, top, 10, 10), nodata=255,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes, 1)
        if palette:
            dst.write_colormap(1, PALETTE)


def _products(root: Path, version: str = "v1", current: bool = True) -> Path:
    """A published folder as `publish` lays it out: two tiles with class and confidence."""
    products = root / "products"
    folder = products / version
    links, classes = [], [{"value": 1, "name": "crop", "color_hint": "E6C229"},
                          {"value": 2, "name": "water", "color_hint": "1F77B4"},
                          {"value": 255, "name": "nodata", "nodata": True}]  # fmt: skip
    boxes = []
    for n, left in enumerate((500000.0, 500080.0)):
        tile = folder / f"T{n}"
        tile.mkdir(parents=True)
        codes = np.full((8, 8), 1 + n, np.uint8)
        codes[0, 0] = 255
        _cog(tile / "class.tif", left, 5630080.0, codes, palette=True)
        _cog(tile / "confidence.tif", left, 5630080.0, np.full((8, 8), 50 + n, np.uint8), False)
        w, s, e, n_ = transform_bounds(
            "EPSG:32631", "EPSG:4326", left, 5630000.0, left + 80, 5630080.0
        )
        boxes.append((w, s, e, n_))
        item = {
            "type": "Feature", "stac_version": "1.1.0", "id": f"t{n}", "links": [],
            "bbox": [w, s, e, n_], "geometry": {"type": "Polygon", "coordinates": [
                [[w, s], [e, s], [e, n_], [w, n_], [w, s]]]},
            "properties": {"datetime": "2023-01-01T00:00:00Z", "pivotmap:model_name": "m",
                           "pivotmap:model_version": "3", "proj:code": "EPSG:32631"},
            "assets": {"class": {"href": "./class.tif", "type": "image/tiff"},
                       "confidence": {"href": "./confidence.tif", "type": "image/tiff"}},
        }  # fmt: skip
        (tile / f"t{n}.json").write_text(json.dumps(item))
        links.append({"rel": "item", "href": f"./T{n}/t{n}.json"})
    tiff = "image/tiff; application=geotiff; profile=cloud-optimized"
    collection = {
        "type": "Collection", "id": "lc", "title": "LC", "stac_version": "1.1.0",
        "description": "LC: land-cover map", "license": "CC-BY-4.0", "version": version,
        "extent": {"spatial": {"bbox": [[*np.min(boxes, axis=0)[:2], *np.max(boxes, axis=0)[2:]]]},
                   "temporal": {"interval": [[None, None]]}},
        "item_assets": {"class": {"type": tiff, "title": "Class", "classification:classes": classes},
                        "confidence": {"type": tiff, "title": "Confidence"}},
        "links": links,
    }  # fmt: skip
    (folder / "collection.json").write_text(json.dumps(collection))
    if current:
        root_links = [{"rel": "child", "href": f"./{version}/collection.json"}]
        root = {"type": "Catalog", "id": "lc-catalog", "stac_version": "1.1.0",
                "description": "LC", "links": root_links}  # fmt: skip
        (products / "catalog.json").write_text(json.dumps(root))
    return products


def _serve(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PIVOTMAP, "serve", *args], capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("pivotmap: error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return errors[0]


def _no_server_in(folder: Path) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(str(folder) in line and "postgres" in line for line in out.splitlines())


# ---------------------------------------------------------------------------- pieces


def test_versions_are_read_with_urls_and_the_current_first(tmp_path):
    products = _products(tmp_path)
    _products(tmp_path, "v0", current=False)
    assert products_folder(tmp_path) == products.resolve()
    assert products_folder(products / "catalog.json") == products.resolve()
    versions = read_versions(products.resolve(), "http://127.0.0.1:9/files/")
    assert [(v.version, v.collection_id, v.current) for v in versions] == [
        ("v1", "lc", True), ("v0", "lc_v0", False)
    ]  # fmt: skip
    item = versions[0].items[0]
    assert item["assets"]["class"]["href"] == "http://127.0.0.1:9/files/v1/T0/class.tif"
    assert item["collection"] == "lc" and item["properties"]["version"] == "v1"
    assert versions[0].model == "m v3"
    assert [c["value"] for c in versions[0].classes] == [1, 2]
    assert {k: la.kind for k, la in versions[0].layers.items()} == {
        "class": "classes", "confidence": "ramp"
    }  # fmt: skip


def test_vrt_mosaic_joins_the_tiles_and_keeps_the_colour_table(tmp_path):
    products = _products(tmp_path)
    layer = read_versions(products.resolve(), "http://x/")[0].layers["class"]
    with rasterio.open(write_vrt(layer.files, tmp_path / "m.vrt")) as src:
        codes = src.read(1)
        assert src.shape == (8, 16) and src.nodata == 255
        assert src.colormap(1)[2] == PALETTE[2]
    assert codes[0, 0] == 255 and codes[0, 8] == 255  # each tile's nodata corner
    assert (codes[1:, :8] == 1).all() and (codes[1:, 8:] == 2).all()


def test_vrt_mosaic_of_several_tiles_has_the_cogs_overviews(tmp_path):
    """GDAL lends a VRT its sources' overviews only with one source per band: the mosaic names
    overview VRTs, so a low zoom reads the COGs' overviews, not every full-resolution pixel."""
    files = []
    for n, left in enumerate((500000.0, 510240.0)):
        codes = np.random.default_rng(n).integers(1, 3, (1024, 1024), dtype=np.uint8)
        path = tmp_path / f"t{n}.tif"
        profile = dict(
            driver="COG", width=1024, height=1024, count=1, dtype="uint8", crs="EPSG:32631",
            transform=from_origin(left, 5630000, 10, 10), nodata=255, overview_resampling="nearest",
        )  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(codes, 1)
        files.append(path)
    with rasterio.open(write_vrt(tuple(files), tmp_path / "m.vrt")) as src:
        assert src.shape == (1024, 2048) and src.overviews(1) == [2, 4, 8]
        low = src.read(1, out_shape=(256, 512))  # the x4 overview VRT
    with rasterio.open(files[1]) as cog:
        assert cog.overviews(1) == [2]  # 512 px blocks: one level; GDAL decimates from it
        np.testing.assert_array_equal(low[:, 256:], cog.read(1, out_shape=(256, 256)))


def test_missing_catalogue_is_one_clear_line(tmp_path):
    with pytest.raises(CatalogueError, match="no published catalogue"):
        products_folder(tmp_path / "nowhere")
    line = _one_error_line(_serve("--out", str(tmp_path / "nowhere")))
    assert "nowhere" in line and "pivotmap demo" in line


def test_port_in_use_is_one_clear_line_and_starts_nothing(tmp_path):
    _products(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_error_line(_serve("--out", str(tmp_path), "--port", str(port)))
    assert f"port {port}" in line and "--port" in line
    assert not (tmp_path / "serve").exists()


@pytest.mark.skipif(pgstac_server.missing_server() is not None, reason="no PostgreSQL/PostGIS")
def test_database_that_cannot_start_is_one_clear_line_and_leaves_nothing(tmp_path):
    _products(tmp_path)
    with socket.socket() as busy:  # PostgreSQL's port taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        db_port = busy.getsockname()[1]
        port = pgstac_server.free_port()
        done = _serve("--out", str(tmp_path), "--port", str(port), "--db-port", str(db_port))
    line = _one_error_line(done)
    assert "database cannot start" in line and str(db_port) in line
    folder = done.stderr.split("PostgreSQL data in ")[1].split(" (")[0]
    assert not Path(folder).exists() and _no_server_in(Path(folder))


@pytest.mark.skipif(pgstac_server.missing_server() is not None, reason="no PostgreSQL/PostGIS")
def test_pgstac_follows_the_current_version_through_publish_and_rollback(tmp_path):
    """What `publish.stac_api` will call: the database holds every kept version, the current
    one under the collection's own id; after a rollback the ids switch and no alias is left."""
    import psycopg

    from pivotmap.flows.status import rollback

    products = _products(tmp_path, "v0")
    _products(tmp_path, "v1")  # published later: now current

    def held(dsn: str) -> list[tuple]:
        with psycopg.connect(dsn) as conn:
            query = (
                "SELECT collection, content->'properties'->>'version', count(*) FROM pgstac.items"
            )
            return sorted(conn.execute(query + " GROUP BY 1, 2").fetchall())

    def sync(dsn: str) -> dict:
        return pgstac_server.sync_products(dsn, products, "http://127.0.0.1:9/files/")

    pg = pgstac_server.Postgres()
    try:
        pg.start()
        pgstac_server.load_pgstac(pg, [], [])
        assert sync(pg.dsn()) == {"lc": 2, "lc_v0": 2}
        assert held(pg.dsn()) == [("lc", "v1", 2), ("lc_v0", "v0", 2)]
        rollback(products, "v0")
        assert sync(pg.dsn()) == {"lc": 2, "lc_v1": 2}
        assert held(pg.dsn()) == [("lc", "v0", 2), ("lc_v1", "v1", 2)]
    finally:
        pg.remove()
    assert not pg.folder.exists()


@pytest.mark.skipif(pgstac_server.missing_server() is not None, reason="no PostgreSQL/PostGIS")
def test_a_second_server_on_the_same_run_is_refused_and_a_stale_one_replaced():
    import shutil
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="pivotmap-serve-test-"))  # open to the `postgres` user
    run.chmod(0o755)
    first = pgstac_server.Postgres(run / "postgres")
    try:
        assert first.in_place and first.folder == run / "postgres"
        first.start()
        with pytest.raises(pgstac_server.DatabaseError, match="already runs"):
            pgstac_server.Postgres(run / "postgres")
        assert first.running()
        pid = int((first.data / "postmaster.pid").read_text().split()[0])
        first.stop()
        with pytest.raises(pgstac_server.DatabaseError, match="pg_ctl failed") as failed:
            first._run([str(first.bin / "pg_ctl"), "-D", str(first.data), "status"])
        assert "shut down" in str(failed.value)  # the server log's tail comes with the error
        (first.data / "postmaster.pid").write_text(f"{pid}\n")  # as a killed server leaves it
        assert not first.running()  # the pid file alone: no server
        again = pgstac_server.Postgres(run / "postgres")  # stale: replaced
        again.start()
        again.remove()
    finally:
        first.remove()
        shutil.rmtree(run, ignore_errors=True)


def test_an_s3_catalogue_is_copied_with_every_kept_version(tmp_path, s3_bucket):
    from pivotmap.tasks.serve_catalogue import mirror_products
    from pivotmap.tasks.storage import parse, upload_tree

    _products(tmp_path, "v0")
    products = _products(tmp_path, "v1")
    upload_tree(products, parse(f"s3://{s3_bucket}/maps/products"))
    local = mirror_products(f"s3://{s3_bucket}/maps/products/catalog.json", tmp_path / "m")
    copied = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert copied == sorted(
        p.relative_to(products).as_posix() for p in products.rglob("*") if p.is_file()
    )
    versions = read_versions(local, "http://127.0.0.1:9/files/")
    assert [(v.version, v.current, len(v.items)) for v in versions] == [
        ("v1", True, 2),
        ("v0", False, 2),
    ]
    with pytest.raises(CatalogueError, match="no published catalogue"):
        mirror_products(f"s3://{s3_bucket}/nothing", tmp_path / "n")
    line = _one_error_line(_serve("--catalog", f"s3://{s3_bucket}/nothing"))
    assert f"s3://{s3_bucket}/nothing" in line


def test_public_address_for_every_interface_and_a_bad_one_is_one_clear_line(tmp_path):
    from pivotmap.flows.serve import public_base

    assert public_base("127.0.0.1", 8080, None) == "http://127.0.0.1:8080/"
    assert public_base("0.0.0.0", 8080, None) == "http://localhost:8080/"
    assert public_base("0.0.0.0", 80, "https://maps.example.org/lc") == (
        "https://maps.example.org/lc/"
    )
    _products(tmp_path)
    line = _one_error_line(_serve("--out", str(tmp_path), "--public-url", "maps.example.org"))
    assert "--public-url 'maps.example.org'" in line and "https://" in line
    assert not (tmp_path / "serve").exists()


@pytest.mark.skipif(pgstac_server.missing_server() is not None, reason="no PostgreSQL/PostGIS")
def test_served_on_every_interface_links_assets_at_the_public_url(tmp_path):
    """As the compose `viewer` service runs it: --host 0.0.0.0, links made from --public-url."""
    import os
    import signal
    import time
    import urllib.request

    _products(tmp_path)
    port = pgstac_server.free_port()
    public = f"http://localhost:{port}/lc/"  # e.g. behind a proxy that strips /lc/
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PIVOTMAP, "serve", "--out", str(tmp_path), "--port", str(port),
             "--host", "0.0.0.0", "--public-url", public],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert f"viewer {public} " in log.read_text()
        url = f"http://127.0.0.1:{port}/api/collections/lc/items"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    items = json.load(answer)["features"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        hrefs = sorted(i["assets"]["class"]["href"] for i in items)
        assert hrefs == [f"{public}files/v1/T0/class.tif", f"{public}files/v1/T1/class.tif"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/files/v1/T0/class.tif") as answer:
            assert answer.read() == (tmp_path / "products/v1/T0/class.tif").read_bytes()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()  # as after Ctrl-C
    assert not (tmp_path / "serve").exists() and _no_server_in(tmp_path / "serve")
