"""Download a published map for a bounding box: find the items, fetch their COGs, mosaic, clip."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pystac
from odc.geo.geom import Geometry, box

from pivotmap.tasks import storage


class DownloadError(RuntimeError):
    """The catalogue cannot be read or holds nothing for the request."""


class UrlStacIO(pystac.StacIO):
    """pystac reads through pivotmap's storage module, so s3:// catalogues work like folders;
    http(s) through urllib (its errors are OSErrors, which the callers name)."""

    def read_text(self, source, *args, **kwargs) -> str:
        href = source if isinstance(source, str) else source.href
        if href.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(href, timeout=30) as answer:
                return answer.read().decode("utf-8")
        return storage.read_bytes(storage.parse(href)).decode("utf-8")

    def write_text(self, dest, txt, *args, **kwargs) -> None:
        raise DownloadError("the download client never writes catalogues")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """'W,S,E,N' in degrees → a tuple; errors say what is wrong."""
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise DownloadError(f"--bbox {text!r} is not W,S,E,N (four numbers in degrees)") from exc
    if not (
        west < east
        and south < north
        and -180 <= west
        and east <= 180
        and -90 <= south
        and north <= 90
    ):
        raise DownloadError(f"--bbox {text!r} is not a valid lon/lat box W,S,E,N")
    return west, south, east, north


def find_items(
    catalog_url: str, bbox: tuple[float, float, float, float], version: str | None = None
) -> list[pystac.Item]:
    """Items of the catalogue's current version (or of `version`) whose footprint intersects
    `bbox` (lon/lat). The catalogue: a products folder or its catalog.json (a path, `s3://` or
    `http(s)://`), or a STAC API (`http(s)://…`, e.g. the one `pivotmap serve` starts)."""
    if catalog_url.startswith(("http://", "https://")):
        return _find_http(catalog_url, bbox, version)
    href = (
        catalog_url if catalog_url.endswith(".json") else catalog_url.rstrip("/") + "/catalog.json"
    )
    loc = storage.parse(href)
    return _static_items(loc.url(), bbox, version, UrlStacIO(), _versions_in(loc.url()))


def _versions_in(catalog_href: str) -> Callable[[], list[str]]:
    """The versions kept beside a folder or s3:// catalog.json (for error messages)."""

    def listed() -> list[str]:
        root = catalog_href.rsplit("/", 1)[0]
        try:
            found = storage.list_files(root, "*/collection.json")
        except Exception:  # only for a message: never hide the real error
            return []
        return sorted(u.rstrip("/").split("/")[-2] for u in found)

    return listed


def _static_items(
    href: str,
    bbox: tuple[float, float, float, float],
    version: str | None,
    stac_io: pystac.StacIO,
    versions: Callable[[], list[str]] = list,
) -> list[pystac.Item]:
    """`find_items` on a static catalogue (catalog.json links to the current version's
    collection; every kept version is a folder beside it)."""
    try:
        if version is None:
            root = pystac.Catalog.from_file(href, stac_io=stac_io)
        else:
            _check_version_name(version)
            collection_href = f"{href.rsplit('/', 1)[0]}/{version}/collection.json"
            root = pystac.Collection.from_file(collection_href, stac_io=stac_io)
    except (storage.StorageError, OSError) as exc:
        if version is None:
            raise DownloadError(f"cannot read catalogue {href}: {storage.url_error(exc)}") from None
        kept = versions()
        listed = f" (kept versions: {', '.join(kept)})" if kept else ""
        raise DownloadError(f"no version {version!r} in catalogue {href}{listed}") from None
    except (ValueError, KeyError, TypeError, pystac.STACError) as exc:
        raise DownloadError(f"{href} is not a STAC catalogue: {storage.url_error(exc)}") from None
    groups: list[tuple[pystac.Catalog, list[pystac.Item]]]
    if isinstance(root, pystac.Collection):
        groups = [(root, list(root.get_items(recursive=True)))]
    else:
        groups = [(c, list(c.get_items(recursive=True))) for c in root.get_children()]
    every = []
    for parent, found in groups:
        _tag_version(found, parent.extra_fields.get("version", version))
        every += found
    if not every:
        raise DownloadError(
            f"catalogue {href} holds no pivotmap products (no items): give the catalog.json "
            "that `pivotmap publish` writes"
        )
    area = box(*bbox, "EPSG:4326")
    items = [i for i in every if _footprint(i).intersects(area)]
    if not items:
        raise DownloadError(f"no map tile of {href} intersects bbox {bbox}")
    return sorted(items, key=lambda i: i.id)


def _check_version_name(version: str) -> None:
    if not version or "/" in version or version in (".", ".."):
        raise DownloadError(f"--version {version!r} is not a version name (e.g. m1-c25cbd1ff)")


def _tag_version(items: list[pystac.Item], version: object) -> None:
    """Items of a static catalogue get the `version` property the STAC API gives them."""
    if version:
        for item in items:
            item.properties.setdefault("version", str(version))


def _get_json(url: str) -> dict:
    """A JSON document over http(s); an unreachable address or a non-JSON answer is a
    `DownloadError` naming the URL."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot reach {url}: {storage.url_error(exc)}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise DownloadError(
            f"{url} answers but not with JSON: give a STAC API or a catalog.json URL"
        ) from None
    if not isinstance(doc, dict):
        raise DownloadError(f"{url} is not a STAC document")
    return doc


def is_stac_api(doc: dict) -> bool:
    """Whether a landing page is a STAC API's (item search), not a static catalogue's."""
    conforms = " ".join(doc.get("conformsTo", []))
    links = {ln.get("rel") for ln in doc.get("links", [])}
    return "item-search" in conforms or "search" in links


def _find_http(
    url: str, bbox: tuple[float, float, float, float], version: str | None
) -> list[pystac.Item]:
    """`find_items` over http(s): a STAC API (searched with pystac-client) or a static
    catalog.json (read with pystac; `URL/` tries `URL/catalog.json`)."""
    try:
        doc = _get_json(url)
    except DownloadError as first:  # e.g. a products folder over http: no index, catalog.json
        if url.endswith(".json"):
            raise
        doc, url = _catalog_json_in(url, first)
    if is_stac_api(doc):
        return _search_api(url, bbox, version)
    if doc.get("type") not in ("Catalog", "Collection") and not url.endswith(".json"):
        doc, url = _catalog_json_in(url, None)
    return _static_items(url, bbox, version, UrlStacIO())


def _catalog_json_in(url: str, first: DownloadError | None) -> tuple[dict, str]:
    """`url`/catalog.json; when there is none, the first error (or: not a catalogue)."""
    href = url.rstrip("/") + "/catalog.json"
    try:
        return _get_json(href), href
    except DownloadError:
        if first is not None:
            raise first from None
        raise DownloadError(
            f"{url} is neither a STAC API nor a catalogue (nor has it a catalog.json): give "
            "the STAC API's root or a published catalog.json"
        ) from None


def _collections(url: str, landing: dict) -> list[dict]:
    """Every collection of a STAC API as JSON (its `data` link, pages followed)."""
    link = next((ln["href"] for ln in landing.get("links", []) if ln.get("rel") == "data"), None)
    page_url: str | None = link or url.rstrip("/") + "/collections"
    found: list[dict] = []
    for _ in range(1000):  # a server whose `next` never ends
        if page_url is None:
            break
        page = _get_json(page_url)
        found += page.get("collections", [])
        page_url = next(
            (ln["href"] for ln in page.get("links", [])
             if ln.get("rel") == "next" and ln.get("method", "GET") == "GET"),
            None,
        )  # fmt: skip
    return found


def _pivotmap_collections(collections: list[dict]) -> dict[str, dict]:
    """The collections holding pivotmap products (a class map described by
    `classification:classes`, or pivotmap's own fields), by id."""

    def is_product(c: dict) -> bool:
        classes = c.get("item_assets", {}).get("class", {}).get("classification:classes")
        return bool(classes) or any(k.startswith("pivotmap:") for k in c)

    return {c["id"]: c for c in collections if is_product(c)}


def _search_api(
    url: str, bbox: tuple[float, float, float, float], version: str | None
) -> list[pystac.Item]:
    """Items of a STAC API by bbox: the current version's collection (its own id; `publish`
    and `pivotmap serve` load older versions as `<id>_<version>`), or the collection of
    `version` (its `version` field)."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(url)
    except (APIError, OSError, ValueError) as exc:
        raise DownloadError(f"cannot open STAC API {url}: {storage.url_error(exc)}") from None
    found = _pivotmap_collections(_collections(url, _get_json(url)))
    if not found:
        raise DownloadError(
            f"STAC API {url} holds no pivotmap products (no collection with a class map): "
            "publish with publish.stac_api, or serve a run with `pivotmap serve`"
        )

    def version_of(c: dict) -> str | None:
        return str(c["version"]) if c.get("version") else None

    if version is None:
        aliases = {
            cid for cid, c in found.items()
            if (v := version_of(c)) and cid.endswith(f"_{v}") and cid[: -len(v) - 1] in found
        }  # fmt: skip
        chosen = sorted(set(found) - aliases)
    else:
        chosen = sorted(cid for cid, c in found.items() if version_of(c) == version)
        if not chosen:
            kept = sorted({v for c in found.values() if (v := version_of(c))})
            raise DownloadError(
                f"no version {version!r} in STAC API {url} (versions: {', '.join(kept) or '-'})"
            )
    try:
        search = client.search(collections=chosen, bbox=list(bbox))
        items = list(search.items())
    except (APIError, OSError, ValueError) as exc:
        raise DownloadError(
            f"the search of STAC API {url} failed: {storage.url_error(exc)}"
        ) from None
    if not items:
        raise DownloadError(f"no map tile of {url} ({', '.join(chosen)}) intersects bbox {bbox}")
    for item in items:
        cid = item.collection_id or ""
        if cid in found:
            item.properties.setdefault("version", version_of(found[cid]) or "")
    return sorted(items, key=lambda i: (i.collection_id or "", i.id))


def _footprint(item: pystac.Item) -> Geometry:
    if item.bbox is None:
        raise DownloadError(f"item {item.id} has no bbox: cannot tell where it lies")
    left, bottom, right, top = item.bbox
    return box(left, bottom, right, top, "EPSG:4326")


def download_map(
    items: list[pystac.Item],
    bbox: tuple[float, float, float, float],
    out: Path,
    asset: str = "class",
    on_file: Callable[[str], None] | None = None,
) -> dict:
    """Mosaic the `asset` COGs of `items` (from `find_items`), clipped to `bbox`, into `out` (a COG
    on the product grid: its pixels are the published ones). Files and `s3://` objects are
    fetched whole; http(s) COGs (a STAC API's asset hrefs) are read in place, only the part in
    the box (HTTP range requests)."""
    crs = {i.properties.get("proj:code") or f"EPSG:{i.properties.get('proj:epsg')}" for i in items}
    if len(crs) != 1:
        raise DownloadError(
            f"the items are in several CRSs {sorted(crs)}: download one zone at a time"
        )
    with tempfile.TemporaryDirectory(prefix="pivotmap-download-") as tmp:
        sources: list[str | Path] = []
        fetched: int | None = 0
        for item in items:
            if asset not in item.assets:
                raise DownloadError(
                    f"item {item.id} has no asset {asset!r} (has {sorted(item.assets)})"
                )
            href = item.assets[asset].get_absolute_href()
            if href is None:
                raise DownloadError(f"item {item.id}: cannot resolve the href of asset {asset!r}")
            if href.startswith(("http://", "https://")):
                sources.append(href)
                fetched = None  # range reads: GDAL does not count them
            else:
                try:
                    path = storage.download(storage.parse(href), Path(tmp) / f"{item.id}.tif")
                except storage.StorageError as exc:
                    raise DownloadError(f"item {item.id}: cannot fetch {href}: {exc}") from None
                sources.append(path)
                if fetched is not None:
                    fetched += path.stat().st_size
            if on_file:
                on_file(item.id)
        versions = sorted(
            {str(i.properties.get("version")) for i in items if i.properties.get("version")}
        )
        models = sorted({str(i.properties.get("pivotmap:model_version", "?")) for i in items})
        tags = {"PRODUCT_VERSION": ",".join(versions), "MODEL_VERSION": ",".join(models)}
        area = box(*bbox, "EPSG:4326").to_crs(crs.pop()).boundingbox
        shape = _mosaic(sources, area, out, {k: v for k, v in tags.items() if v})
    return {
        "out": str(out), "items": [i.id for i in items], "asset": asset, "shape": list(shape),
        "bytes": out.stat().st_size, "bytes_fetched": fetched, "versions": versions,
        "model_versions": models,
    }  # fmt: skip


def _mosaic(sources: list[str | Path], bounds, out: Path, tags: dict[str, str]) -> tuple[int, int]:
    """The sources merged over `bounds`, widened to whole pixels of their grid (so the output
    pixels are the sources' own), into a COG with the first source's colour table."""
    import rasterio
    from rasterio.errors import RasterioIOError
    from rasterio.merge import merge

    with rasterio.Env(**storage.gdal_env()):
        opened = []
        try:
            for source in sources:
                try:
                    opened.append(rasterio.open(source))
                except RasterioIOError as exc:
                    raise DownloadError(f"cannot read {source}: {exc}") from None
            res = opened[0].res
            origin = opened[0].transform.c, opened[0].transform.f
            data, transform = merge(
                opened, bounds=_on_grid(tuple(bounds), res, origin), nodata=opened[0].nodata
            )
            profile = {
                "driver": "COG", "width": data.shape[2], "height": data.shape[1],
                "count": data.shape[0], "dtype": data.dtype.name, "crs": opened[0].crs,
                "transform": transform, "nodata": opened[0].nodata, "compress": "DEFLATE",
            }  # fmt: skip
            colormap = _colormap(opened[0])
        finally:
            for src in opened:
                src.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
        if colormap:
            dst.write_colormap(1, colormap)
        if tags:
            dst.update_tags(**tags)
    return data.shape[1], data.shape[2]


def _on_grid(bounds: tuple[float, float, float, float], res, origin) -> tuple[float, ...]:
    """`bounds` widened to the pixel edges of the grid with pixel size `res` through `origin`."""
    import math

    (left, bottom, right, top), (rx, ry), (ox, oy) = bounds, res, origin
    return (
        ox + math.floor((left - ox) / rx) * rx, oy + math.floor((bottom - oy) / ry) * ry,
        ox + math.ceil((right - ox) / rx) * rx, oy + math.ceil((top - oy) / ry) * ry,
    )  # fmt: skip


def _colormap(src) -> dict | None:
    try:
        return src.colormap(1)
    except ValueError:  # no colour table (e.g. the confidence layer)
        return None
