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
    """pystac reads through pivotmap's storage module, so s3:// catalogues work like folders."""

    def read_text(self, source, *args, **kwargs) -> str:
        href = source if isinstance(source, str) else source.href
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


def find_items(catalog_url: str, bbox: tuple[float, float, float, float]) -> list[pystac.Item]:
    """Items of the catalogue's current version whose footprint intersects `bbox` (lon/lat)."""
    href = (
        catalog_url if catalog_url.endswith(".json") else catalog_url.rstrip("/") + "/catalog.json"
    )
    loc = storage.parse(href)
    try:
        root = pystac.Catalog.from_file(loc.url(), stac_io=UrlStacIO())
    except storage.StorageError as exc:
        raise DownloadError(f"cannot read catalogue {href}: {exc}") from exc
    area = box(*bbox, "EPSG:4326")
    items = [i for i in root.get_items(recursive=True) if _footprint(i).intersects(area)]
    if not items:
        raise DownloadError(f"no map tile of {href} intersects bbox {bbox}")
    return sorted(items, key=lambda i: i.id)


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
    """Mosaic the `asset` COGs of `items` (from `find_items`), clipped to `bbox`, into `out` (a COG)."""
    crs = {i.properties.get("proj:code") or f"EPSG:{i.properties.get('proj:epsg')}" for i in items}
    if len(crs) != 1:
        raise DownloadError(
            f"the items are in several CRSs {sorted(crs)}: download one zone at a time"
        )
    with tempfile.TemporaryDirectory(prefix="pivotmap-download-") as tmp:
        files = []
        for item in items:
            if asset not in item.assets:
                raise DownloadError(
                    f"item {item.id} has no asset {asset!r} (has {sorted(item.assets)})"
                )
            href = item.assets[asset].get_absolute_href()
            if href is None:
                raise DownloadError(f"item {item.id}: cannot resolve the href of asset {asset!r}")
            files.append(
                storage.download(
                    storage.parse(href),
                    Path(tmp) / f"{item.id}.tif",
                )
            )
            if on_file:
                on_file(item.id)
        fetched = sum(f.stat().st_size for f in files)
        shape = _mosaic(files, box(*bbox, "EPSG:4326").to_crs(crs.pop()).boundingbox, out)
    versions = sorted({str(i.properties.get("pivotmap:model_version", "?")) for i in items})
    return {
        "out": str(out), "items": [i.id for i in items], "asset": asset, "shape": list(shape),
        "bytes": out.stat().st_size, "bytes_fetched": fetched, "model_versions": versions,
    }  # fmt: skip


def _mosaic(files: list[Path], bounds, out: Path) -> tuple[int, int]:
    import rasterio
    from rasterio.merge import merge

    sources = [rasterio.open(f) for f in files]
    try:
        data, transform = merge(sources, bounds=tuple(bounds), nodata=sources[0].nodata)
        profile = {
            "driver": "COG", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
            "dtype": data.dtype.name, "crs": sources[0].crs, "transform": transform,
            "nodata": sources[0].nodata, "compress": "DEFLATE",
        }  # fmt: skip
        colormap = _colormap(sources[0])
    finally:
        for src in sources:
            src.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
        if colormap:
            dst.write_colormap(1, colormap)
    return data.shape[1], data.shape[2]


def _colormap(src) -> dict | None:
    try:
        return src.colormap(1)
    except ValueError:  # no colour table (e.g. the confidence layer)
        return None
