"""The published versions of a products folder, made ready to serve: STAC documents for pgstac
(asset hrefs as URLs of the server) and one VRT mosaic per version and map layer for the tiler.

A products folder (as `publish` writes it) holds `catalog.json`, which links to the current
version's `collection.json`, and one folder per kept version. The current version is loaded
under the collection's own id (so a plain search finds the current map); older versions under
`<id>_<version>`. Every item gets the STAC `version` property, so a search can also ask for a
version with CQL2 (`version = '…'`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import rasterio
from odc.geo.geobox import GeoBox

from pivotmap.tasks.cog import MosaicBands, write_mosaic_vrt

# Assets drawn as layers: (key prefix, kind). 'classes' keeps the COG's colour table; 'ramp'
# scales 0–100 % through a colour ramp; 'explanation' draws its first band (dominant variable).
LAYER_KINDS = {"class": "classes", "confidence": "ramp", "concept-": "ramp", "explanation": "index"}


class CatalogueError(ValueError):
    """The catalogue to serve is missing or not a pivotmap products folder."""


@dataclass(frozen=True)
class Layer:
    key: str  # the asset key: class, confidence, concept-…, explanation
    title: str
    kind: str  # classes | ramp | index
    files: tuple[Path, ...]
    categories: tuple[str, ...] = ()  # index layers: what band 1's values name
    windows: tuple[str, ...] = ()  # index layers: what band 2's values name (months)


@dataclass(frozen=True)
class ServedVersion:
    version: str
    collection_id: str  # its id in the API
    current: bool
    folder: Path
    collection: dict
    items: list[dict]
    layers: dict[str, Layer] = field(default_factory=dict)

    @property
    def classes(self) -> list[dict]:
        assets = self.collection.get("item_assets", {})
        classes = assets.get("class", {}).get("classification:classes", [])
        return [c for c in classes if not c.get("nodata")]

    @property
    def bbox(self) -> list[float]:
        return self.collection["extent"]["spatial"]["bbox"][0]

    @property
    def model(self) -> str:
        props = self.items[0]["properties"] if self.items else {}
        name, number = props.get("pivotmap:model_name"), props.get("pivotmap:model_version")
        return f"{name} v{number}" if name else "-"


def products_folder(catalog: str | Path) -> Path:
    """The products folder from `--catalog` (catalog.json or its folder) or a run folder."""
    path = Path(catalog)
    if path.is_dir() and (path / "products" / "catalog.json").is_file():
        path = path / "products"
    if path.is_dir():
        path = path / "catalog.json"
    if not path.is_file():
        raise CatalogueError(
            f"no published catalogue at {catalog}: give a run folder (--out) with products/, "
            "or a products folder / its catalog.json (--catalog); run `pivotmap demo` first"
        )
    return path.parent.resolve()


def current_version(products: Path) -> str:
    root = json.loads((products / "catalog.json").read_text())
    for link in root.get("links", []):
        if link.get("rel") == "child":
            return Path(link["href"]).parent.name
    raise CatalogueError(f"{products / 'catalog.json'} links to no collection")


def _with_urls(doc: dict, doc_path: Path, products: Path, base_url: str) -> dict:
    """A STAC document with relative asset hrefs made URLs under `base_url` and local links
    dropped (pgstac and the API make their own)."""
    out = json.loads(json.dumps(doc))
    for asset in out.get("assets", {}).values():
        href = asset["href"]
        if "://" not in href:
            rel = (doc_path.parent / href).resolve().relative_to(products)
            asset["href"] = base_url.rstrip("/") + "/" + rel.as_posix()
    out["links"] = [ln for ln in out.get("links", []) if "://" in ln.get("href", "")]
    return out


def _layers(collection: dict, items: list[tuple[Path, dict]]) -> dict[str, Layer]:
    layers = {}
    for key, spec in collection.get("item_assets", {}).items():
        kind = next((k for p, k in LAYER_KINDS.items() if key == p or key.startswith(p)), None)
        if kind is None or not spec.get("type", "").startswith("image/tiff"):
            continue
        files = tuple(
            (path.parent / item["assets"][key]["href"]).resolve()
            for path, item in items
            if key in item.get("assets", {})
        )
        if files:
            layers[key] = Layer(
                key, spec.get("title", key), kind, files,
                tuple(spec.get("pivotmap:variables", ())), tuple(spec.get("pivotmap:windows", ())),
            )  # fmt: skip
    return layers


def read_versions(products: Path, base_url: str) -> list[ServedVersion]:
    """Every version kept in `products` (current first), with asset hrefs under `base_url`."""
    current = current_version(products)
    found = []
    for cpath in sorted(products.glob("*/collection.json")):
        collection = json.loads(cpath.read_text())
        version = cpath.parent.name
        is_current = version == current
        cid = collection["id"] if is_current else f"{collection['id']}_{version}"
        raw = []
        for link in collection["links"]:
            if link["rel"] == "item":
                ipath = (cpath.parent / link["href"]).resolve()
                raw.append((ipath, json.loads(ipath.read_text())))
        items = []
        for ipath, item in raw:
            doc = _with_urls(item, ipath, products, base_url)
            doc["collection"] = cid
            doc["properties"]["version"] = version
            items.append(doc)
        doc = _with_urls(collection, cpath, products, base_url)
        doc["id"] = cid
        doc["version"] = version  # STAC's version field: what `pivotmap download --version` asks
        found.append(
            ServedVersion(version, cid, is_current, cpath.parent, doc, items, _layers(doc, raw))
        )
    if not found:
        raise CatalogueError(f"no version folder with a collection.json in {products}")
    found.sort(key=lambda v: (not v.current, -v.folder.stat().st_mtime))
    return found


def write_vrt(files: tuple[Path, ...], out: Path) -> Path:
    """A VRT mosaic of a layer's tiles (`cog.write_mosaic_vrt`, with the first tile's bands,
    nodata and colour table), so the tiler reads a version's layer as one dataset, and a low
    zoom reads the COGs' own overviews."""
    sources, bands = [], None
    for f in files:
        with rasterio.open(f) as src:
            sources.append((f, GeoBox((src.height, src.width), src.transform, src.crs)))
            if bands is None:
                palette = src.colorinterp[0].name == "palette"
                bands = MosaicBands(
                    src.count, src.dtypes[0], src.nodata, src.colormap(1) if palette else None
                )
    return write_mosaic_vrt(out, sources, bands=bands)


def build_mosaics(versions: list[ServedVersion], folder: Path) -> dict[tuple[str, str], Path]:
    """One VRT per (version, layer) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        (v.version, key): write_vrt(layer.files, folder / f"{v.version}_{key}.vrt")
        for v in versions
        for key, layer in v.layers.items()
    }


def _parts(href: str, where: str) -> list[str]:
    """A relative href as path parts; one that climbs out of its folder is refused."""
    parts = [p for p in href.split("/") if p not in ("", ".")]
    if "://" in href or ".." in parts:
        raise CatalogueError(f"{where}: href {href!r} is not inside the products folder")
    return parts


def mirror_products(url: str, dest: Path) -> Path:
    """A remote products folder copied into `dest`: catalog.json and, for every kept version,
    its collection, items and their assets, which is what serving reads. On `s3://` every kept
    version is found (listed); over http(s), which lists nothing, the versions catalog.json
    links to (the current one). A STAC API is refused: it is served already."""
    from pivotmap.tasks import storage

    root = url.removesuffix("/catalog.json").rstrip("/")
    over_http = root.startswith(("http://", "https://"))
    if over_http:
        _refuse_stac_api(url)

    def fetch(*parts: str) -> Path:
        target = dest.joinpath(*parts)
        if over_http:
            return _download_http("/".join((root, *parts)), target)
        return storage.download(storage.parse(storage.join(root, *parts)), target)

    try:
        catalog = json.loads(fetch("catalog.json").read_text())
    except (storage.StorageError, OSError, ValueError) as exc:
        raise CatalogueError(f"no published catalogue at {url}: {storage.url_error(exc)}") from None
    if over_http:
        versions = [
            _parts(link["href"], "catalog.json")[0]
            for link in catalog.get("links", [])
            if link.get("rel") == "child" and link["href"].endswith("/collection.json")
        ]
    else:
        versions = [
            u.rstrip("/").split("/")[-2] for u in storage.list_files(root, "*/collection.json")
        ]
    for version in versions:
        collection = json.loads(fetch(version, "collection.json").read_text())
        for link in collection["links"]:
            if link["rel"] != "item":
                continue
            rel = _parts(link["href"], f"{version}/collection.json")
            item = json.loads(fetch(version, *rel).read_text())
            for asset in item.get("assets", {}).values():
                if "://" not in asset["href"]:
                    fetch(version, *rel[:-1], *_parts(asset["href"], "/".join(rel)))
    return dest


def _download_http(url: str, dest: Path) -> Path:
    import shutil
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as answer, dest.open("wb") as out:
        shutil.copyfileobj(answer, out, 1 << 20)
    return dest


def _refuse_stac_api(url: str) -> None:
    """A STAC API (its landing page conforms to item-search) is not a products folder."""
    import urllib.request

    from pivotmap.tasks.download import is_stac_api

    if url.endswith(".json"):
        return
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            doc = json.loads(answer.read())
    except (OSError, ValueError):
        return  # a folder over http: no index page; catalog.json is tried next
    if isinstance(doc, dict) and is_stac_api(doc):
        raise CatalogueError(
            f"{url} is a STAC API, which serves its maps already: `pivotmap serve` serves a "
            "published catalogue (a folder, s3://… or http(s)://…/catalog.json); to fetch maps "
            "from the API use `pivotmap download --catalog URL`"
        )
