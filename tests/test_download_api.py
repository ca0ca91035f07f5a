"""`pivotmap download` against a STAC API and a static catalogue over HTTP, and the WMTS layers,
on what `pivotmap serve` starts for a small published folder (two versions, two tiles each).

The output is the one a folder catalogue gives: the published pixels on the product grid, the
colour table, the version tags. Errors (an address nobody answers, a STAC API without pivotmap
products, a version that is not kept) are one line each.
"""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.warp import transform_bounds

from pivotmap.flows.cli import main
from pivotmap.tasks.download import DownloadError, find_items
from pivotmap.tasks.pgstac_server import free_port, missing_server
from tests.test_serve import PALETTE, _cog, _products
from tests.test_viewer import Served

pytestmark = [  # one `pivotmap serve` for the module: ~10 s to start on a loaded 2-core machine
    pytest.mark.slow,
    pytest.mark.skipif(missing_server() is not None, reason="no PostgreSQL/PostGIS"),
]

WMTS = "{http://www.opengis.net/wmts/1.0}"
OWS = "{http://www.opengis.net/ows/1.1}"


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> Path:
    """v0 (older: codes 2 and 1) and v1 (current: codes 1 and 2), as `publish` lays them out."""
    root = tmp_path_factory.mktemp("published")
    _products(root, "v0", current=False)
    for n, left in enumerate((500000.0, 500080.0)):  # v0 holds the other class in each tile
        codes = np.full((8, 8), 2 - n, np.uint8)
        codes[0, 0] = 255
        _cog(root / "products" / "v0" / f"T{n}" / "class.tif", left, 5630080.0, codes, True)
    return _products(root, "v1")


@pytest.fixture(scope="module")
def served(products):
    server = Served(products.parent, free_port(), ("--catalog", str(products)))
    yield server
    server.stop()


def _bbox_inside(margin_m: float = 13) -> tuple[float, float, float, float]:
    """A lon/lat box a little inside the two tiles (x 500000–500160, y 5630000–5630080)."""
    return transform_bounds(
        "EPSG:32631", "EPSG:4326",
        500000 + margin_m, 5630000 + margin_m, 500160 - margin_m, 5630080 - margin_m,
    )  # fmt: skip


def _expected(products: Path, version: str, bounds) -> np.ndarray:
    """The published pixels of `version` under `bounds` (UTM), read from its COGs."""
    left, bottom, right, top = bounds
    out = np.full((round((top - bottom) / 10), round((right - left) / 10)), 255, np.uint8)
    for n in range(2):
        with rasterio.open(products / version / f"T{n}" / "class.tif") as src:
            for r in range(out.shape[0]):
                for c in range(out.shape[1]):
                    x, y = left + 10 * c + 5, top - 10 * r - 5
                    if (
                        src.bounds.left < x < src.bounds.right
                        and src.bounds.bottom < y < src.bounds.top
                    ):
                        out[r, c] = src.read(1)[src.index(x, y)]
    return out


def _download(catalog: str, out: Path, *extra: str, capsys) -> dict:
    bbox = ",".join(f"{v:.7f}" for v in _bbox_inside())
    code = main(
        ["download", "--catalog", catalog, "--bbox", bbox, "--out", str(out), "--json", *extra]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _check_map(path: Path, products: Path, version: str) -> None:
    with rasterio.open(path) as got:
        assert got.crs.to_epsg() == 32631 and got.res == (10.0, 10.0)
        left, top = got.transform.c, got.transform.f
        assert left % 10 == 0 and top % 10 == 0  # on the product grid
        assert got.tags()["PRODUCT_VERSION"] == version and got.tags()["MODEL_VERSION"] == "3"
        assert got.colormap(1)[2] == PALETTE[2]
        codes = got.read(1)
        bounds = got.bounds
    # the box 13 m inside the tiles, widened to whole pixels: 10 m inside on each side
    assert tuple(bounds) == (500010, 5630010, 500150, 5630070)
    np.testing.assert_array_equal(codes, _expected(products, version, bounds))


# ---------------------------------------------------------------------------- download


def test_download_through_the_stac_api_is_the_published_map(served, products, tmp_path, capsys):
    summary = _download(served.url + "api/", tmp_path / "current.tif", capsys=capsys)
    assert summary["items"] == ["t0", "t1"] and summary["versions"] == ["v1"]
    assert summary["bytes_fetched"] is None  # COGs read in place over HTTP (range requests)
    _check_map(tmp_path / "current.tif", products, "v1")

    older = _download(served.url + "api", tmp_path / "v0.tif", "--version", "v0", capsys=capsys)
    assert older["versions"] == ["v0"]
    _check_map(tmp_path / "v0.tif", products, "v0")


def test_download_of_a_static_catalogue_over_http(served, products, tmp_path, capsys):
    summary = _download(served.url + "files/catalog.json", tmp_path / "c.tif", capsys=capsys)
    assert summary["versions"] == ["v1"]
    _check_map(tmp_path / "c.tif", products, "v1")
    _download(served.url + "files/", tmp_path / "v0.tif", "--version", "v0", capsys=capsys)
    _check_map(tmp_path / "v0.tif", products, "v0")


def test_the_folder_catalogue_gives_the_same_file(served, products, tmp_path, capsys):
    _download(str(products), tmp_path / "folder.tif", "--version", "v0", capsys=capsys)
    _check_map(tmp_path / "folder.tif", products, "v0")


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nobody answers there


def test_bad_catalogues_are_one_clear_line(served, products, tmp_path, capsys):
    bbox = _bbox_inside()
    with pytest.raises(DownloadError, match=r"no version 'v9' in .*\(kept versions: v0, v1\)"):
        find_items(str(products), bbox, "v9")
    dead = f"http://127.0.0.1:{_dead_port()}/api/"
    with pytest.raises(DownloadError, match=rf"^cannot reach {dead}: .*refused"):
        find_items(dead, bbox)
    with pytest.raises(DownloadError, match=r"no version 'v9' in STAC API .*\(versions: v0, v1\)"):
        find_items(served.url + "api/", bbox, "v9")
    with pytest.raises(DownloadError, match=r"no version 'v9' in catalogue .*files/catalog.json"):
        find_items(served.url + "files/catalog.json", bbox, "v9")
    with pytest.raises(DownloadError, match="intersects"):
        find_items(served.url + "api/", (10.0, 45.0, 10.1, 45.1))
    with pytest.raises(DownloadError, match=r"answers but not with JSON"):
        find_items(served.url, bbox)  # the viewer's page
    code = main(
        ["download", "--catalog", dead, "--bbox", "3,50,4,51", "--out", str(tmp_path / "x.tif")]
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pivotmap: error")]
    assert code == 1 and len(errors) == 1 and dead in errors[0]


def test_a_stac_api_without_pivotmap_products_is_named(tmp_path):
    from tests.stac_api import serve_catalog

    folder = tmp_path / "other" / "s2"
    folder.mkdir(parents=True)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "scene", "collection": "s2",
        "bbox": [2.9, 50.7, 3.1, 50.9], "links": [{"rel": "collection", "href": "./collection.json"}],
        "geometry": {"type": "Polygon", "coordinates": [[[2.9, 50.7], [3.1, 50.7], [3.1, 50.9],
                                                          [2.9, 50.9], [2.9, 50.7]]]},
        "properties": {"datetime": "2023-06-01T00:00:00Z"},
        "assets": {"B04": {"href": "./B04.tif", "type": "image/tiff"}},
    }  # fmt: skip
    (folder / "scene.json").write_text(json.dumps(item))
    collection = {
        "type": "Collection", "id": "s2", "stac_version": "1.0.0", "description": "scenes",
        "license": "proprietary", "links": [{"rel": "item", "href": "./scene.json"}],
        "extent": {"spatial": {"bbox": [[2.9, 50.7, 3.1, 50.9]]},
                   "temporal": {"interval": [["2023-01-01T00:00:00Z", None]]}},
    }  # fmt: skip
    (folder / "collection.json").write_text(json.dumps(collection))
    catalog = {"type": "Catalog", "id": "c", "stac_version": "1.0.0", "description": "c",
               "links": [{"rel": "child", "href": "./s2/collection.json"}]}  # fmt: skip
    (tmp_path / "other" / "catalog.json").write_text(json.dumps(catalog))
    with serve_catalog(tmp_path / "other" / "catalog.json") as url:
        with pytest.raises(DownloadError, match="holds no pivotmap products"):
            find_items(url, _bbox_inside())


# ---------------------------------------------------------------------------- WMTS


def _capabilities(served, query: str) -> ET.Element:
    body = served.get(f"tiles/WMTSCapabilities.xml?{query}")
    return ET.fromstring(body)


@pytest.mark.parametrize("layer", ["class", "confidence"])
def test_wmts_capabilities_parse_and_their_tiles_are_pngs(served, layer):
    import morecantile

    config = json.loads(served.get("viewer.json"))
    entry = next(la for la in config["versions"][0]["layers"] if la["key"] == layer)
    root = _capabilities(served, entry["wmts"].split("?", 1)[1])
    layers = root.findall(f"{WMTS}Contents/{WMTS}Layer")
    assert [la.findtext(f"{OWS}Identifier") for la in layers] == [
        f"pivotmap_v1_{layer}_WebMercatorQuad_default"
    ]
    matrix_set = layers[0].findtext(f"{WMTS}TileMatrixSetLink/{WMTS}TileMatrixSet")
    assert matrix_set == "WebMercatorQuad"
    assert root.find(f"{WMTS}Contents/{WMTS}TileMatrixSet") is not None
    template = layers[0].find(f"{WMTS}ResourceURL").get("template")
    assert f"version=v1&layer={layer}" in template
    tile = morecantile.tms.get("WebMercatorQuad").tile(3.0011, 50.8221, 18)
    url = (
        template.replace("{TileMatrix}", str(tile.z))
        .replace("{TileCol}", str(tile.x))
        .replace("{TileRow}", str(tile.y))
    )
    assert url.startswith(served.url)
    body = served.get(url[len(served.url) :])
    image = Image.open(BytesIO(body))
    assert image.format == "PNG"
    rgba = np.asarray(image.convert("RGBA")).reshape(-1, 4)
    colours = {tuple(int(v) for v in c[:3]) for c in rgba if c[3] == 255}
    if layer == "class":  # the colour table
        assert colours and colours <= {rgb[:3] for rgb in PALETTE.values()}
    else:  # 50 % and 51 % through viridis: not the class colours
        assert colours and not colours & {rgb[:3] for rgb in PALETTE.values()}


# ---------------------------------------------------------------------------- serve --catalog http


def test_serve_a_catalogue_over_http(served, products):
    """What one server publishes over HTTP, another serves: the version catalog.json links to
    (HTTP lists no folders, so older versions need a folder or s3://)."""
    from pystac_client import Client

    other = Served(products.parent, free_port(), ("--catalog", served.url + "files/"))
    try:
        config = json.loads(other.get("viewer.json"))
        assert [v["version"] for v in config["versions"]] == ["v1"]
        items = Client.open(other.url + "api/").search(collections=["lc"]).items()
        assert sorted(i.id for i in items) == ["t0", "t1"]
        mirror = Path(config["catalog"]).parent.parent
        assert mirror.is_dir()
    finally:
        assert other.stop() == 130
    assert not mirror.exists()


def test_serve_refuses_a_stac_api_in_one_line(served):
    from tests.test_serve import _one_error_line, _serve

    line = _one_error_line(_serve("--catalog", served.url + "api/", "--port", str(free_port())))
    assert "is a STAC API" in line and "pivotmap download --catalog" in line
    dead = f"http://127.0.0.1:{_dead_port()}/products/"
    line = _one_error_line(_serve("--catalog", dead, "--port", str(free_port())))
    assert f"no published catalogue at {dead}" in line and "refused" in line
