"""`pivotmap serve` on a demo run with two published versions, driven like a user would: the
viewer in headless Chromium (Debian's `chromium` through Playwright; `.ci/run` installs it), the
STAC API through pystac-client, tiles over HTTP, and Ctrl-C.

The run: `pivotmap demo`, then `pivotmap produce --no-train` with the period ending a month
earlier (a new cube, hence a new product version that becomes current; the demo's version is
the previous one). Screenshots go to the test's folder (paths printed with `-s`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer

from pivotmap.tasks.pgstac_server import free_port, missing_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run"]  # fmt: skip
PIVOTMAP = str(Path(sys.executable).with_name("pivotmap"))


def _skip_reason() -> str | None:
    if reason := missing_server():
        return reason
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install -e '.[test]')"
    return None


def _cli(*args: str) -> None:
    done = subprocess.run([PIVOTMAP, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    if reason := _skip_reason():
        pytest.skip(reason)
    run = tmp_path_factory.mktemp("served") / "run"
    if reuse := os.environ.get("PIVOTMAP_TEST_SERVED_RUN"):  # a two-version run made earlier
        shutil.copytree(reuse, run, ignore=shutil.ignore_patterns("serve"))
        return run
    _cli("demo", "--out", str(run))
    config = run / "demo.yaml"
    config.write_text(config.read_text().replace("end: '2023-12-31'", "end: '2023-11-30'"))
    _cli("produce", "--no-train", "--config", str(config), "--out", str(run))
    return run


def _versions(run: Path) -> tuple[str, str]:
    """(current, previous) product versions of the run."""
    products = run / "products"
    root = json.loads((products / "catalog.json").read_text())
    current = next(ln["href"] for ln in root["links"] if ln["rel"] == "child").split("/")[1]
    others = [p.parent.name for p in products.glob("*/collection.json")]
    previous = next(v for v in others if v != current)
    return current, previous


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "viewer.json", timeout=5):
            return True
    except OSError:
        return False


class Served:
    def __init__(self, run: Path, port: int, source: tuple[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.log = run.parent / f"serve-{port}.log"
        self.started = time.monotonic()
        where = source or ("--out", str(run))
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [PIVOTMAP, "serve", *where, "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait()
        except BaseException:
            self.stop()  # a server that does not answer is not left behind
            raise
        self.startup_s = time.monotonic() - self.started

    def _wait(self) -> None:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        while not _answers(self.url):  # the message comes just before uvicorn binds the port
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as answer:
            return answer.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # what Ctrl-C does
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


@pytest.fixture(scope="module")
def served(run_dir):
    server = Served(run_dir, free_port())
    print(f"\nserve started in {server.startup_s:.1f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, served, tmp_path):
    """A viewer page with its console errors collected (and a screenshot helper)."""
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.errors = []
    page.requested = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on(  # tiles the map no longer needs are cancelled (ERR_ABORTED): not a failure
        "requestfailed",
        lambda r: r.failure != "net::ERR_ABORTED" and page.errors.append(f"failed {r.url}"),
    )
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(served.url)
    page.wait_for_function("document.body.dataset.ready", timeout=60_000)
    page.shots = tmp_path
    yield page
    page.close()


def _wait_ready(page, what: str) -> None:
    page.wait_for_function(f"document.body.dataset.ready === {json.dumps(what)}", timeout=60_000)


def _map_pixels(page, name: str) -> np.ndarray:
    """A screenshot of the map area alone (RGB), saved as `name`.png."""
    box = page.locator("#map").bounding_box()
    path = page.shots / f"{name}.png"
    page.screenshot(path=path, clip=box)
    print(f"screenshot: {path}")
    return np.asarray(Image.open(path).convert("RGB"))


def _legend(page) -> dict[int, tuple[int, int, int]]:
    rows = page.eval_on_selector_all(
        "#legend .legend-row", "rows => rows.map(r => [r.dataset.value, r.dataset.color])"
    )
    return {int(v): tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for v, c in rows}


def _colour_table(run: Path, version: str) -> dict[int, tuple[int, int, int]]:
    with rasterio.open(run / "products" / version / "mosaic_class.tif") as src:
        return {k: v[:3] for k, v in src.colormap(1).items() if 1 <= k <= 6}


BACKGROUND = (0xE9, 0xEC, 0xEF)


def _near(colour, palette, tol: int = 3) -> bool:
    return any(
        max(abs(int(a) - int(b)) for a, b in zip(colour, p, strict=True)) <= tol for p in palette
    )


# ---------------------------------------------------------------------------- the viewer


def test_page_draws_the_class_layer_in_the_legend_colours(page, run_dir):
    current, _ = _versions(run_dir)
    assert page.evaluate("document.body.dataset.ready") == f"{current}/class"
    legend = _legend(page)
    assert legend == _colour_table(run_dir, current)  # legend = classification:classes = COG
    page.fill("#opacity", "100")
    page.dispatch_event("#opacity", "input")
    page.wait_for_timeout(500)
    pixels = _map_pixels(page, "class-layer").reshape(-1, 3)
    counts = Counter(map(tuple, pixels))
    drawn = {c: n for c, n in counts.items() if not _near(c, [BACKGROUND], 2)}
    in_legend = sum(n for c, n in drawn.items() if _near(c, legend.values()))
    assert sum(drawn.values()) > 0.3 * len(pixels)  # the map fills a good part of the view
    assert in_legend / sum(drawn.values()) > 0.97  # only edge pixels of controls may differ
    seen = {v for v, rgb in legend.items() if any(_near(c, [rgb]) for c in drawn)}
    assert len(seen) >= 5, seen
    assert page.errors == []


def test_click_reads_the_class_the_cog_holds(page, run_dir):
    current, _ = _versions(run_dir)
    box = page.locator("#map").bounding_box()
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)
    with rasterio.open(run_dir / "products" / current / "mosaic_class.tif") as src:
        for fx, fy in ((0.5, 0.5), (0.35, 0.3), (0.65, 0.7)):
            page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            page.wait_for_function(
                "document.getElementById('info').dataset.classValue", timeout=20_000
            )
            lnglat = page.evaluate(
                "[pivotmapViewer.state.lastClick.lng, pivotmapViewer.state.lastClick.lat]"
            )
            x, y = to_utm.transform(*lnglat)
            expected = next(src.sample([(x, y)]))[0]
            shown = page.eval_on_selector("#info", "e => e.dataset.classValue")
            assert int(shown) == int(expected)
            text = page.inner_text("#info")
            assert "pivotmap-demo v" in text and current in text and "%" in text
            page.evaluate("document.getElementById('info').dataset.classValue = ''")
    page.screenshot(path=page.shots / "clicked.png")
    print(f"screenshot: {page.shots / 'clicked.png'}")
    assert page.errors == []


def test_switch_to_confidence_and_to_the_previous_version(page, run_dir):
    current, previous = _versions(run_dir)
    page.check("input[name=layer][value=confidence]")
    _wait_ready(page, f"{current}/confidence")
    assert page.locator("#legend .ramp").count() == 1
    legend_colours = _legend_from_class(run_dir, current)
    pixels = _map_pixels(page, "confidence-layer").reshape(-1, 3)
    drawn = [tuple(c) for c in pixels[::37] if not _near(c, [BACKGROUND], 2)]
    assert drawn and sum(_near(c, legend_colours) for c in drawn) < 0.2 * len(drawn)
    page.select_option("#version", previous)
    _wait_ready(page, f"{previous}/confidence")
    assert previous in page.inner_text("#model")
    _map_pixels(page, "previous-version-confidence")
    assert any(f"version={previous}&layer=confidence" in u for u in page.requested)
    page.check("input[name=layer][value=explanation]")  # categories from pivotmap:variables
    _wait_ready(page, f"{previous}/explanation")
    collection = json.loads((run_dir / "products" / previous / "collection.json").read_text())
    variables = collection["item_assets"]["explanation"]["pivotmap:variables"]
    assert page.locator("#legend .legend-row").all_inner_texts() == variables
    page.check("input[name=layer][value=class]")
    _wait_ready(page, f"{previous}/class")
    assert previous in page.get_attribute("#download", "href")
    assert f"pivotmap rollback {previous} --out {run_dir}" in page.inner_text("#command")
    assert page.errors == []


def _legend_from_class(run: Path, version: str) -> list[tuple[int, int, int]]:
    return list(_colour_table(run, version).values())


# ---------------------------------------------------------------------------- API and tiles


def _item_ids(run: Path, version: str) -> set[str]:
    folder = run / "products" / version
    return {p.stem for p in folder.glob("*/*.json")}


def test_stac_search_returns_exactly_the_published_items(served, run_dir):
    from pystac_client import Client

    current, previous = _versions(run_dir)
    client = Client.open(served.url + "api/")
    collection = json.loads((run_dir / "products" / current / "collection.json").read_text())
    bbox = collection["extent"]["spatial"]["bbox"][0]
    cid = collection["id"]
    found = client.search(collections=[cid], bbox=bbox, datetime="2023-01-01/2023-12-31")
    items = list(found.items())
    assert {i.id for i in items} == _item_ids(run_dir, current)
    assert all(i.properties["version"] == current for i in items)
    older = client.search(collections=[f"{cid}_{previous}"], bbox=bbox).items()
    assert {i.id for i in older} == _item_ids(run_dir, previous)
    by_version = client.search(
        bbox=bbox, filter={"op": "=", "args": [{"property": "version"}, previous]},
        filter_lang="cql2-json",
    )  # fmt: skip
    assert {i.id for i in by_version.items()} == _item_ids(run_dir, previous)
    assert list(client.search(bbox=[10, 10, 11, 11]).items()) == []
    assert list(client.search(collections=[cid], datetime="2020-01-01/2020-12-31").items()) == []
    one = items[0]
    href = one.assets["class"].href
    assert href.startswith(served.url + "files/")
    with rasterio.open(href) as src:  # the asset URL serves the COG (byte ranges)
        assert src.colormap(1)[1][:3] == _colour_table(run_dir, current)[1]


def test_tile_png_matches_the_colour_table(served, run_dir):
    import morecantile

    current, _ = _versions(run_dir)
    collection = json.loads((run_dir / "products" / current / "collection.json").read_text())
    w, s, e, n = collection["extent"]["spatial"]["bbox"][0]
    tile = morecantile.tms.get("WebMercatorQuad").tile((w + e) / 2, (s + n) / 2, 16)
    path = (
        f"tiles/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}.png?version={current}&layer=class"
    )
    times = []
    for _ in range(5):
        t = time.perf_counter()
        body = served.get(path)
        times.append(time.perf_counter() - t)
    print(f"tile latency: first {times[0] * 1000:.0f} ms, median {sorted(times)[2] * 1000:.0f} ms")
    image = np.asarray(Image.open(BytesIO(body)).convert("RGBA")).reshape(-1, 4)
    opaque = image[image[:, 3] == 255][:, :3]
    table = _colour_table(run_dir, current)
    assert len(opaque) > 0.5 * len(image)
    colours = {tuple(int(v) for v in c) for c in np.unique(opaque, axis=0)}
    assert colours <= set(table.values()), colours - set(table.values())
    assert len(colours) >= 4


def test_download_this_view_is_the_published_map(served, run_dir):
    _, previous = _versions(run_dir)
    collection = json.loads((run_dir / "products" / previous / "collection.json").read_text())
    w, s, e, n = collection["extent"]["spatial"]["bbox"][0]
    bbox = f"{w + (e - w) / 4},{s + (n - s) / 4},{e - (e - w) / 4},{n - (n - s) / 4}"
    body = served.get(f"download/{previous}/class.tif?bbox={bbox}")
    with rasterio.MemoryFile(body) as mem, mem.open() as got:
        assert got.crs.to_epsg() == 32631 and got.dtypes == ("uint8",)
        window_bounds = got.bounds
        codes = got.read(1)
        assert got.colormap(1)[1][:3] == _colour_table(run_dir, previous)[1]
    with rasterio.open(run_dir / "products" / previous / "mosaic_class.tif") as src:
        window = src.window(*window_bounds)
        expected = src.read(1, window=window.round_offsets().round_lengths())
    assert codes.shape == expected.shape and (codes == expected).all()


def test_ctrl_c_stops_everything_it_started(run_dir):
    server = Served(run_dir, free_port())
    try:
        log = server.log.read_text()
        data = log.split("PostgreSQL data in ")[1].split(" (")[0]
        assert _postgres_running(data)
        assert json.loads(server.get("viewer.json"))["versions"]
    finally:
        code = server.stop()
    assert code == 130
    assert not _postgres_running(data)
    assert not Path(data).exists()
    assert not (run_dir / "serve" / f"mosaics-{server.url.split(':')[-1].strip('/')}").exists()
    assert "pivotmap: interrupted" in server.log.read_text()


def test_serves_a_catalogue_on_s3(run_dir, s3_bucket):
    from pystac_client import Client

    from pivotmap.tasks.storage import parse, upload_tree

    current, previous = _versions(run_dir)
    upload_tree(run_dir / "products", parse(f"s3://{s3_bucket}/lc/products"))
    server = Served(run_dir, free_port(), ("--catalog", f"s3://{s3_bucket}/lc/products"))
    try:
        config = json.loads(server.get("viewer.json"))
        assert [v["version"] for v in config["versions"]][0] == current
        assert {v["version"] for v in config["versions"]} == {current, previous}
        items = (
            Client.open(server.url + "api/")
            .search(collections=[config["versions"][0]["collection"]])
            .items()
        )
        assert {i.id for i in items} == _item_ids(run_dir, current)
        mirror = Path(config["catalog"]).parent.parent
    finally:
        assert server.stop() == 130
    assert not mirror.exists()  # the copy is removed with the server


def _postgres_running(data_folder: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any(data_folder in line and "postgres" in line for line in out.splitlines())
