"""One ASGI app for the published maps: the STAC API (stac-fastapi-pgstac) under `/api`, tiles
(titiler-core over one VRT mosaic per version and layer) under `/tiles`, the product files under
`/files` (byte ranges, for GDAL and `pivotmap download`) and the MapLibre viewer at `/`.

`/viewer.json` tells the viewer what there is: versions (current first), their layers with tile
URL templates, legend (`classification:classes`), bbox and model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

from pivotmap.tasks.serve_catalogue import Layer, ServedVersion

RAMP = "viridis"  # confidence and concept probabilities: 0–100 % through this ramp


def viewer_dir() -> Path:
    """The viewer's static files (installed as package data of `pivotmap`)."""
    import pivotmap

    return Path(pivotmap.__file__).resolve().parent / "viewer"


def _software_version() -> str:
    from importlib.metadata import version

    return version("pivotmap")


def _ramp_stops(name: str, n: int = 6) -> list[str]:
    from rio_tiler.colormap import cmap

    table = cmap.get(name)
    rgbs = [table[round(i * 255 / (n - 1))][:3] for i in range(n)]
    return ["#" + "".join(f"{c:02x}" for c in rgb) for rgb in rgbs]


# Categories of index layers (the explanation's dominant variable): matplotlib's tab20.
CATEGORY_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def _layer_query(version: str, layer: Layer) -> str:
    query = f"version={version}&layer={layer.key}"
    if layer.kind == "ramp":
        query += f"&rescale=0,100&colormap_name={RAMP}"
    elif layer.kind == "index":
        n = max(len(layer.categories), 1)
        cmap = {i: CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)] for i in range(n)}
        query += "&bidx=1&colormap=" + quote(json.dumps(cmap, separators=(",", ":")))
    return query


def _legend(layer: Layer) -> list[dict]:
    """Index layers: one row per category (value, name, colour)."""
    return [
        {"value": i, "name": name, "color": CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)]}
        for i, name in enumerate(layer.categories)
    ]


def _layer_entry(version: str, layer: Layer) -> dict:
    """One layer for the viewer: tile, point and download URL templates, legend entries."""
    key = layer.key
    return {
        "key": key, "title": layer.title, "kind": layer.kind,
        "tiles": "tiles/tiles/WebMercatorQuad/{z}/{x}/{y}.png?" + _layer_query(version, layer),
        "categories": _legend(layer), "windows": list(layer.windows),
        "point": f"tiles/point/{{lon}},{{lat}}?version={version}&layer={key}",
        "wmts": "tiles/WMTSCapabilities.xml?" + _layer_query(version, layer),
        "download": f"download/{version}/{key}.tif?bbox={{bbox}}",
    }  # fmt: skip


def viewer_config(versions: list[ServedVersion], title: str, catalog: Path) -> dict:
    """What the viewer shows: versions, layers (tile URL templates), legends, bbox, model."""
    out = []
    for v in versions:
        order = ["classes", "ramp", "index"]
        ordered = sorted(v.layers.values(), key=lambda la: order.index(la.kind))
        layers = [_layer_entry(v.version, layer) for layer in ordered]
        out.append(
            {
                "version": v.version,
                "collection": v.collection_id,
                "current": v.current,
                "bbox": v.bbox,
                "model": v.model,
                "classes": v.classes,
                "layers": layers,
            }  # fmt: skip
        )
    return {
        "title": title,
        "catalog": str(catalog),
        "run": str(catalog.parent.parent),
        "ramp": {"name": RAMP, "stops": _ramp_stops(RAMP)},
        "versions": out,
    }


def _tiler(mosaics: dict[tuple[str, str], Path]):
    """titiler-core over the VRT mosaics (`?version=V&layer=L`), in Web Mercator (what web maps
    and the viewer use), with OGC WMTS capabilities (titiler-extensions) for QGIS."""
    from morecantile import TileMatrixSets
    from morecantile import tms as known_tms
    from titiler.core.factory import TilerFactory
    from titiler.extensions import wmtsExtension

    names = {str(path): f"pivotmap_{version}_{layer}" for (version, layer), path in mosaics.items()}

    def layer_path(
        version: Annotated[str, Query(description="published map version")],
        layer: Annotated[str, Query(description="layer: class, confidence, concept-…")],
    ) -> str:
        path = mosaics.get((version, layer))
        if path is None:
            served = sorted({f"{v}/{k}" for v, k in mosaics})
            raise HTTPException(404, f"no layer {layer!r} in version {version!r}; served: {served}")
        return str(path)

    return TilerFactory(
        path_dependency=layer_path, router_prefix="/tiles", add_viewer=False, add_preview=False,
        supported_tms=TileMatrixSets({"WebMercatorQuad": known_tms.get("WebMercatorQuad")}),
        extensions=[wmtsExtension(layer_identifier_provider=lambda p: names.get(p, "pivotmap"))],
    )  # fmt: skip


def _add_download(app: FastAPI, versions: list[ServedVersion]) -> None:
    """`/download/{version}/{asset}.tif?bbox=W,S,E,N`: what `pivotmap download` makes (a COG of
    the tiles' codes, colour table and CRS kept), for any served version."""
    import shutil
    import tempfile

    import pystac
    from fastapi.responses import FileResponse
    from starlette.background import BackgroundTask

    from pivotmap.tasks.download import DownloadError, download_map, parse_bbox

    folders = {v.version: v.folder for v in versions}

    @app.get("/download/{version}/{asset}.tif", tags=["download"])
    def download(version: str, asset: str, bbox: Annotated[str, Query()]) -> FileResponse:
        if version not in folders:
            raise HTTPException(404, f"no version {version!r}; served: {sorted(folders)}")
        try:
            area = parse_bbox(bbox)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        collection = pystac.Collection.from_file(str(folders[version] / "collection.json"))
        w, s, e, n = area
        items = [
            i for i in collection.get_items()
            if i.bbox and i.bbox[0] < e and i.bbox[2] > w and i.bbox[1] < n and i.bbox[3] > s
        ]  # fmt: skip
        if not items:
            raise HTTPException(404, f"no map tile of version {version} intersects {bbox}")
        for item in items:
            item.properties.setdefault("version", version)
        tmp = Path(tempfile.mkdtemp(prefix="pivotmap-serve-"))
        out = tmp / f"{version}_{asset}.tif"
        try:
            download_map(sorted(items, key=lambda i: i.id), area, out, asset)
        except DownloadError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HTTPException(404, str(exc)) from None
        return FileResponse(
            out, media_type="image/tiff; application=geotiff; profile=cloud-optimized",
            filename=out.name, background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
        )  # fmt: skip


def build_app(
    versions: list[ServedVersion],
    mosaics: dict[tuple[str, str], Path],
    products: Path,
    postgres_env: dict[str, str],
    title: str,
) -> FastAPI:
    """The whole server as one app (the database must be up and loaded when it starts)."""
    import logging

    # stac-fastapi builds a default Settings() of its own on import and warns that its title is
    # the default one; ours (below) has them all.
    logging.getLogger("stac_fastapi.types.config").setLevel(logging.ERROR)
    from stac_fastapi.pgstac.app import instantiate_api
    from stac_fastapi.pgstac.config import PostgresSettings, Settings
    from stac_fastapi.pgstac.db import close_db_connection, connect_to_db
    from stac_fastapi.pgstac.models.extensions import Extensions
    from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers

    db = PostgresSettings(
        pguser=postgres_env["PGUSER"], pgpassword=postgres_env["PGPASSWORD"],
        pghost=postgres_env["PGHOST"], pgport=int(postgres_env["PGPORT"]),
        pgdatabase=postgres_env["PGDATABASE"], db_min_conn_size=1, db_max_conn_size=4,
    )  # fmt: skip
    settings = Settings(
        prefix_path="/api", openapi_url="/api/openapi.json", docs_url="/api/docs",
        stac_fastapi_title=title, stac_fastapi_description=f"{title}: published land-cover maps",
        stac_fastapi_landing_id="pivotmap", stac_fastapi_version=_software_version(),
        enabled_extensions=["query", "sort", "fields", "filter", "pagination", "collection_search"],
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await connect_to_db(app, postgres_settings=db)
        yield
        await close_db_connection(app)

    app = instantiate_api(
        extensions=Extensions(settings=settings), lifespan=lifespan, settings=settings
    ).app
    app.include_router(_tiler(mosaics).router, prefix="/tiles", tags=["tiles"])
    add_exception_handlers(app, DEFAULT_STATUS_CODES)
    config = viewer_config(versions, title, products / "catalog.json")

    @app.get("/api", include_in_schema=False)
    def api_root() -> RedirectResponse:  # the landing page is /api/
        return RedirectResponse("/api/")

    @app.get("/viewer.json", include_in_schema=False)
    def viewer_json() -> JSONResponse:
        return JSONResponse(config)

    _add_download(app, versions)
    app.mount("/files", StaticFiles(directory=products), name="files")
    app.mount("/", StaticFiles(directory=viewer_dir(), html=True), name="viewer")
    return app
