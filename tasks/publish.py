"""Publish a run's maps: stage COGs, mosaic, quicklook, stats and STAC, then swap them in atomically."""

from __future__ import annotations

import dataclasses
import filecmp
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pystac
from odc.geo.geobox import GeoBox

from pivotmap.results import (
    ConceptResult,
    ExplainResult,
    IngestResult,
    ModelRef,
    PivotResult,
    PredictResult,
    PublishResult,
    StageNotRun,
)
from pivotmap.runtime import request_slot
from pivotmap.tasks import cog, quicklook, stac_products, storage
from pivotmap.tasks.concept_products import LayerFile, layer_asset
from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature

if TYPE_CHECKING:
    from pivotmap.config import RunConfig
    from pivotmap.tasks.workspace import Workspace

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PublishError(RuntimeError):
    """Products cannot be published (bad input, invalid STAC, or a clashing version)."""


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value to compare
class TileMap:
    """One predicted tile: class codes (uint8, 255 = nodata) and confidence (0..100, 255)."""

    tile_id: str
    geobox: GeoBox
    classes: np.ndarray
    confidence: np.ndarray

    def __post_init__(self) -> None:
        shape = (self.geobox.height, self.geobox.width)
        for name in ("classes", "confidence"):
            array = getattr(self, name)
            if array.dtype != np.uint8 or array.shape != shape:
                raise PublishError(
                    f"tile {self.tile_id}: {name} must be uint8 of shape {shape} (the tile's "
                    f"GeoBox), got {array.dtype} {array.shape}"
                )
        if ((self.confidence > 100) & (self.confidence != NODATA_CODE)).any():
            raise PublishError(
                f"tile {self.tile_id}: confidence holds values above 100; scale it to percent "
                f"0..100 and use {NODATA_CODE} for no data"
            )


@dataclass(frozen=True)
class Provenance:
    """Where a map came from: model, cube, inputs, software and configuration."""

    model_name: str
    model_version: str
    model_run_id: str
    model_uri: str
    cube_url: str
    cube_version: str
    period_start: str
    period_end: str
    source_item_count: int
    source_collections: Sequence[str]
    software_version: str
    config_hash: str
    model_card: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # mlm:* fields
    calendar_shift_days: int = 0  # predict moved every series this much (`models.calendar`)

    def stac_properties(self) -> dict[str, Any]:
        """Provenance as `pivotmap:*` STAC fields, on every Item and the Collection.

        Locations go out as `public_ref`s: a local cube path becomes its name (the version
        identifies it), never the producer's path."""
        fields = ("model_name", "model_version", "model_run_id")
        props: dict[str, Any] = {f"pivotmap:{name}": getattr(self, name) for name in fields}
        props["pivotmap:model_uri"] = stac_products.public_ref(self.model_uri)
        props["pivotmap:cube_url"] = stac_products.public_ref(self.cube_url)
        props["pivotmap:cube_version"] = self.cube_version
        props["pivotmap:source_item_count"] = self.source_item_count
        props["pivotmap:source_collections"] = list(self.source_collections)
        props["pivotmap:config_hash"] = self.config_hash
        props["pivotmap:calendar_shift_days"] = self.calendar_shift_days
        return props

    def lineage(self) -> str:
        """One sentence for `processing:lineage`."""
        return (
            f"Classes predicted by model {self.model_name} version {self.model_version} "
            f"({stac_products.public_ref(self.model_uri)}, run {self.model_run_id}) from data "
            f"cube {stac_products.public_ref(self.cube_url)} "
            f"version {self.cube_version}, built from {self.source_item_count} items of "
            f"{', '.join(self.source_collections)} between {self.period_start} and {self.period_end}"
            + (
                f", every pixel's series moved {self.calendar_shift_days} days to the calendar "
                "the model learnt."
                if self.calendar_shift_days
                else "."
            )
        )

    def run_metadata(self) -> stac_products.RunMetadata:
        return stac_products.RunMetadata(
            period_start=self.period_start,
            period_end=self.period_end,
            software_version=self.software_version,
            lineage=self.lineage(),
            properties=self.stac_properties(),
            model=self.model_metadata(),
        )

    def model_metadata(self) -> dict[str, Any]:
        """The model for the Collection's MLM fields: its card plus name, version and URI."""
        uri = stac_products.public_ref(self.model_uri)
        return {**self.model_card, "name": self.model_name, "version": self.model_version,
                "uri": uri}  # fmt: skip


def _check_request(maps: Sequence[TileMap], nomenclature: Nomenclature, version: str) -> None:
    """Refuse input that would publish a wrong or unreadable product."""
    if not _SAFE_NAME.fullmatch(version):
        raise PublishError(
            f"version {version!r} must be a plain folder name such as '2025.1' or 'v3'"
        )
    if not maps:
        raise PublishError("no tiles to publish: `maps` is empty")
    ids = [m.tile_id for m in maps]
    bad = [i for i in ids if not _SAFE_NAME.fullmatch(i)]
    if bad or len(set(ids)) != len(ids):
        raise PublishError(f"tile ids must be unique plain names; got duplicates or {bad}")
    allowed = np.zeros(256, dtype=bool)
    allowed[[*nomenclature.codes, NODATA_CODE]] = True
    for m in maps:
        unknown = np.flatnonzero(
            np.bincount(m.classes.ravel(), minlength=256).astype(bool) & ~allowed
        )
        if unknown.size:
            raise PublishError(
                f"tile {m.tile_id} holds class codes {unknown.tolist()} that nomenclature "
                f"{nomenclature.name!r} does not define; fix the model's label mapping"
            )


def _stage_tile(
    staging: Path,
    tile: TileMap,
    nomenclature: Nomenclature,
    run: stac_products.RunMetadata,
    layers: Sequence[LayerFile] = (),
) -> pystac.Item:
    """Write one tile's class and confidence COGs and describe them in an Item."""
    folder = staging / tile.tile_id
    class_tif = cog.write_class_cog(
        folder / f"{tile.tile_id}_class.tif", tile.classes, tile.geobox,
        nomenclature.colormap(), {c.code: c.name for c in nomenclature.classes},
    )  # fmt: skip
    confidence_tif = cog.write_confidence_cog(
        folder / f"{tile.tile_id}_confidence.tif", tile.confidence, tile.geobox
    )
    counts = quicklook.class_counts(tile.classes)
    assets = {
        "class": stac_products.class_asset(class_tif, f"./{class_tif.name}", nomenclature, counts),
        "confidence": stac_products.confidence_asset(confidence_tif, f"./{confidence_tif.name}"),
        **_categories_asset("class_categories", class_tif),
    }
    for layer in layers:  # concept maps, explanation layers (issue 9)
        copy = folder / f"{tile.tile_id}_{layer.key}.tif"
        shutil.copyfile(layer.path, copy)
        assets[layer.key] = layer_asset(layer, copy, f"./{copy.name}")
    return stac_products.build_tile_item(tile.tile_id, tile.geobox, assets, run)


def _categories_asset(key: str, raster: Path) -> dict[str, pystac.Asset]:
    """The `.aux.xml` beside a class raster (category names and attribute table, which GDAL
    before 3.12 cannot keep inside a GeoTIFF) as an asset, so downloaders fetch it too."""
    sidecar = cog.sidecar_path(raster)
    if not sidecar.is_file():
        return {}
    title = f"Category names and attribute table of {raster.name} (GDAL PAM)"
    asset = stac_products.file_asset(sidecar, f"./{sidecar.name}", "application/xml",
                                     ["metadata"], title)  # fmt: skip
    return {key: asset}


def _item_hrefs(maps: Sequence[TileMap]) -> pystac.layout.CustomLayoutStrategy:
    """Items at `<tile id>/<item id>.json`: the folder and COGs keep the tile id (downloads,
    mirrors and readers of older versions rely on it), the file is named like the lowercase
    Item id (stac-check wants file name == id)."""
    folders = {stac_products.item_id(m.tile_id): m.tile_id for m in maps}

    def item_href(item: pystac.Item, parent_dir: str) -> str:
        return str(Path(parent_dir) / folders[item.id] / f"{item.id}.json")

    return pystac.layout.CustomLayoutStrategy(item_func=item_href)


def _stage_run_products(
    staging: Path,
    maps: Sequence[TileMap],
    nomenclature: Nomenclature,
    title: str,
    mosaic_cog: bool = False,
    *,
    period: str = "",
    version: str = "",
) -> dict[str, pystac.Asset]:
    """Write the mosaic VRT, quicklook PNG and class-area table; return their assets."""
    classes = [(m.classes, m.geobox) for m in maps]
    sources = [(staging / m.tile_id / f"{m.tile_id}_class.tif", m.geobox) for m in maps]
    names = {c.code: c.name for c in nomenclature.classes}
    vrt = cog.write_mosaic_vrt(
        staging / "mosaic_class.vrt", sources, nomenclature.colormap(), names
    )
    png = quicklook.write_quicklook(
        staging / "quicklook.png", classes, nomenclature, title, period=period, version=version
    )
    areas = staging / "class_areas.json"
    table = quicklook.class_areas(classes, nomenclature)
    areas.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    mosaic = stac_products.mosaic_asset(
        vrt, "./mosaic_class.vrt", stac_products.VRT_MEDIA_TYPE, "Class mosaic (GDAL VRT)",
        nomenclature,
    )  # fmt: skip
    extra = {}
    if mosaic_cog:
        tif = cog.write_mosaic_cog(staging / "mosaic_class.tif", vrt)
        extra["mosaic_cog"] = stac_products.mosaic_asset(
            tif, "./mosaic_class.tif", pystac.MediaType.COG, "Class mosaic (COG)", nomenclature
        )
        extra |= _categories_asset("mosaic_cog_categories", tif)
    return {
        **extra,
        "mosaic": mosaic,
        "quicklook": stac_products.file_asset(
            png, "./quicklook.png", pystac.MediaType.PNG, ["overview"], "Quicklook with legend"
        ),
        "class_areas": stac_products.file_asset(
            areas, "./class_areas.json", pystac.MediaType.JSON, ["metadata"], "Area per class (km²)"
        ),
    }


def _save_collection(
    collection: pystac.Collection,
    staging: Path,
    out_dir: Path,
    strategy: pystac.layout.HrefLayoutStrategy,
    self_url: str | None = None,
) -> None:
    """Save the Collection self-contained; its root link is `../catalog.json` (set at commit).

    Every link stays relative, so the folder relocates. With a public `self_url` (from
    publish.base_url) the Collection also gets an absolute `self` link: the STAC spec wants
    `self` absolute, so without a public URL there is none (a local path would leak, and a
    relative one breaks the spec)."""
    # A stand-in root at the final catalogue location makes pystac write the root and parent
    # links relative to it; the staging folder and out_dir/<version> are siblings, so they hold.
    root = pystac.Catalog(
        id="root", description="stand-in", catalog_type=pystac.CatalogType.SELF_CONTAINED
    )
    root.set_self_href(str(out_dir / "catalog.json"))
    root.add_child(collection, title=collection.title)
    collection.normalize_hrefs(str(staging), strategy=strategy)
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    path = staging / "collection.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for link in data["links"]:  # stac-check wants a title on every link of a collection
        if link["rel"] in ("root", "parent"):
            link.setdefault("title", collection.title)
    if self_url:
        data["links"].insert(0, {"rel": "self", "href": self_url, "type": "application/json"})
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _stage(
    staging: Path,
    maps: Sequence[TileMap],
    nomenclature: Nomenclature,
    run: stac_products.RunMetadata,
    *,
    collection_id: str,
    title: str,
    version: str,
    mosaic_cog: bool = False,
    layers: Mapping[str, Sequence[LayerFile]] | None = None,
) -> pystac.Collection:
    """Write every file of the version into `staging`; returns the in-memory Collection."""
    layers = layers or {}
    items = [_stage_tile(staging, m, nomenclature, run, layers.get(m.tile_id, ())) for m in maps]
    assets = _stage_run_products(
        staging, maps, nomenclature, title, mosaic_cog,
        period=f"{run.period_start} – {run.period_end}", version=version,
    )  # fmt: skip
    collection = stac_products.build_collection(
        collection_id, title, version, items, assets, run, nomenclature
    )
    self_url = _public_url(run.base_url, version, "collection.json")
    _save_collection(collection, staging, staging.parent, _item_hrefs(maps), self_url)
    return collection


def _public_url(base_url: str | None, *parts: str) -> str | None:
    """`base_url/part/…`, or None without a base URL."""
    return "/".join([base_url.rstrip("/"), *parts]) if base_url else None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _same_tree(a: Path, b: Path) -> bool:
    """True when both folders hold the same relative paths with the same bytes."""
    files_a, files_b = _files(a), _files(b)
    if [p.relative_to(a) for p in files_a] != [p.relative_to(b) for p in files_b]:
        return False
    return all(filecmp.cmp(pa, pb, shallow=False) for pa, pb in zip(files_a, files_b, strict=True))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(staging: Path, final: Path) -> bool:
    """Rename `staging` to `final`; True when `final` already holds exactly the same files."""
    if final.exists():
        if _same_tree(staging, final):
            return True
        raise PublishError(
            f"{final} already exists with different content: publish under a new version, or "
            "remove that folder first if it must be replaced"
        )
    # Data must be on disk before the rename makes it visible, or a crash could expose
    # empty files under the final name.
    for path in [*staging.rglob("*"), staging]:
        _fsync(path)
    os.rename(staging, final)
    _fsync(final.parent)
    return False


def _root_catalog_text(out_dir: Path, version: str, collection_id: str, title: str) -> str:
    """catalog.json: the entry point, linking to the current version's Collection only.

    Its `self` link (absolute) follows the Collection's: present only when that version was
    published under a public base URL, so a rollback keeps it consistent."""
    catalog = pystac.Catalog(
        id=f"{collection_id}-catalog",
        title=title,
        description=f"{title}: entry point to the current published version ({version}).",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    catalog.set_self_href(str(out_dir / "catalog.json"))
    target = str(out_dir / version / "collection.json")
    catalog.add_link(
        pystac.Link(pystac.RelType.CHILD, target, pystac.MediaType.JSON, f"{title} {version}")
    )
    data = catalog.to_dict(include_self_link=False)
    if base := _published_base(out_dir / version / "collection.json", version):
        data["links"].insert(0, {"rel": "self", "href": f"{base}/catalog.json",
                                 "type": "application/json"})  # fmt: skip
    return json.dumps(data, indent=2) + "\n"


def _published_base(collection_path: Path, version: str) -> str | None:
    """The public base URL a version was published under (from its Collection's `self`)."""
    if not collection_path.is_file():
        return None
    links = json.loads(collection_path.read_text(encoding="utf-8")).get("links", [])
    href = next((link["href"] for link in links if link["rel"] == "self"), "")
    suffix = f"/{version}/collection.json"
    return href[: -len(suffix)] if href.endswith(suffix) else None


def served_version(catalog: dict) -> str | None:
    """The version a root catalog.json (as `_root_catalog_text` writes it) serves, or None."""
    child = next((link["href"] for link in catalog["links"] if link["rel"] == "child"), None)
    return Path(child).parent.name if child else None


def write_root_catalog(out_dir: Path, version: str, collection_id: str, title: str) -> None:
    """Point catalog.json at `version` via temp file + os.replace; readers never see half a file."""
    path = out_dir / "catalog.json"
    text = _root_catalog_text(out_dir, version, collection_id, title)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = out_dir / f".catalog.json.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(out_dir)


def _validate_online(collection: pystac.Collection) -> None:
    """Validate with the schemas fetched from their published URLs (pystac's default)."""
    try:
        collection.validate_all()
    except pystac.errors.STACValidationError as exc:
        raise PublishError(
            f"STAC for collection {collection.id!r} is invalid; nothing published: {exc}"
        ) from exc
    except OSError as exc:  # no network: say how to validate offline
        raise PublishError(
            f"cannot fetch the STAC schemas to validate {collection.id!r} ({exc}); set "
            "publish.validate_stac: offline with publish.schema_dir, or 'off'"
        ) from exc


def _validate_staged(collection: pystac.Collection, schema_dir: Path) -> None:
    """Refuse to publish STAC that breaks its schemas (checked offline)."""
    try:
        stac_products.validate_offline(collection, schema_dir)
    except (pystac.errors.STACValidationError, stac_products.OfflineSchemaError) as exc:
        raise PublishError(
            f"STAC for collection {collection.id!r} is invalid; nothing published: {exc}"
        ) from exc


def publish_products(
    maps: list[TileMap],
    nomenclature: Nomenclature,
    provenance: Provenance,
    out_dir: Path,
    *,
    collection_id: str,
    title: str,
    version: str,
    schema_dir: Path | None = None,
    validation: str | None = None,
    license: str = "CC-BY-4.0",
    providers: Sequence[dict] = (),
    mosaic_cog: bool = False,
    layers: Mapping[str, Sequence[LayerFile]] | None = None,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Publish `maps` as `out_dir/<version>/` (COGs, mosaic, quicklook, stats, STAC), atomically.

    Re-publishing identical content is a no-op (`already_published`); catalog.json switches to
    the version only once its folder is whole. `validation` is 'offline' (schemas from
    `schema_dir`), 'online' (schemas fetched by pystac) or 'off'; default offline when
    `schema_dir` is given, else off. `layers` adds files (concept maps, explanation layers) as
    assets of the tile Items, by tile id. `base_url`: the public URL of `out_dir`, for absolute
    `self` links on catalog.json and the Collection (all other links stay relative).
    """
    validation = validation or ("offline" if schema_dir is not None else "off")
    started = time.perf_counter()
    _check_request(maps, nomenclature, version)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / version
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the version from
    # other readers (web server, sync jobs); mkdir honours the umask.
    _sweep_stale_staging(out_dir)
    staging = out_dir / _staging_name(version)
    staging.mkdir()
    try:
        run = dataclasses.replace(
            provenance.run_metadata(),
            license=license,
            providers=tuple(pystac.Provider.from_dict(p) for p in providers),
            base_url=base_url,
        )
        collection = _stage(
            staging, maps, nomenclature, run, collection_id=collection_id, title=title,
            version=version, mosaic_cog=mosaic_cog, layers=layers,
        )  # fmt: skip
        if validation == "offline":
            if schema_dir is None:
                raise PublishError("offline STAC validation needs publish.schema_dir")
            _validate_staged(collection, Path(schema_dir))
        elif validation == "online":
            _validate_online(collection)
        already = _commit(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    # Also on a no-op: a crash between rename and this write must heal on the rerun.
    write_root_catalog(out_dir, version, collection_id, title)
    files = _files(final)
    return {
        "version": version,
        "collection": str(final / "collection.json"),
        "catalog": str(out_dir / "catalog.json"),
        "tiles_published": len(maps),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "class_areas": json.loads((final / "class_areas.json").read_text(encoding="utf-8")),
        "already_published": already,
        "validated": validation,
        "duration_s": round(time.perf_counter() - started, 3),
    }


def _staging_name(version: str) -> str:
    """A hidden staging folder that names its writer (host, pid), so a later run can tell a
    crashed writer's leftovers from a live writer's work."""
    host = socket.gethostname().replace("-", "_")
    return f".staging-{version}-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _sweep_stale_staging(folder: Path) -> list[str]:
    """Remove staging folders of writers on this host that no longer run (killed mid-publish)."""
    host, removed = socket.gethostname().replace("-", "_"), []
    for path in folder.glob(".staging-*"):
        parts = path.name.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue  # another host's, or an older naming: leave it
        try:
            os.kill(int(parts[2]), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of another user
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def mirror_published(out_dir: Path, version: str, target_url: str, on_file=None) -> dict[str, Any]:
    """Copy a published version from `out_dir` to `target_url` (folder or s3://), catalogue last.

    Readers of the target keep getting the previous version until its catalog.json is replaced;
    objects already there with the same content are not sent again.
    """
    source, target = Path(out_dir) / version, storage.parse(target_url)
    if not (source / "collection.json").is_file():
        raise PublishError(f"{source} is not a published version: publish it first")
    catalog = Path(out_dir) / "catalog.json"
    if target.is_s3:
        stats = storage.upload_tree(source, target.join(version), on_file)
        client = storage.s3_client()
        key = target.join("catalog.json").path
        storage.put_file(client, catalog, target.bucket, key)  # the switch, last
        return {"target": target.url(), **stats}
    dest = Path(target.path)
    if dest.resolve() == Path(out_dir).resolve():
        return {"target": str(dest), "uploaded": 0, "unchanged": len(_files(source))}
    dest.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(dest)
    staging = dest / _staging_name(version)
    shutil.copytree(source, staging)
    try:
        already = _commit(staging, dest / version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tmp = dest / f".catalog.json.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(catalog, tmp)
    os.replace(tmp, dest / "catalog.json")
    n = len(_files(dest / version))
    return {"target": str(dest), "uploaded": 0 if already else n, "unchanged": n if already else 0}


# ---------------------------------------------------------------------------- the stage


def publish(ws: Workspace) -> PublishResult:
    """The publish stage: gate the run's maps, then publish them with their provenance.

    A failed gate publishes nothing and returns `published=False` with the suite's outcome. A
    run folder on s3:// is published in a local staging folder, then mirrored to
    `ws.products_url` (objects first, catalog.json last); earlier versions stay there untouched.
    """
    started = time.monotonic()
    if ws.config.publish.stac_api and storage.is_remote(ws.root):
        raise PublishError(
            f"publish.stac_api loads the run's products folder, which is on {ws.root}: publish "
            "from a local run folder, or load the products with `pivotmap serve --catalog`"
        )
    nomenclature = map_nomenclature(ws)
    maps = load_maps(ws)
    quality = gate_maps(ws, maps, nomenclature).to_dict()
    if not quality["success"]:
        return PublishResult(published=False, quality=quality)
    predict = ws.read_result(PredictResult)
    pivot = ws.read_result(PivotResult)
    shift_days = int(predict.calendar_shift.get("days", 0))
    version = product_version(predict.model.version, pivot.cube_version, shift_days)
    provenance = build_provenance(
        ws.config, ws.read_result(IngestResult), pivot, predict.model, nomenclature, shift_days
    )
    with tempfile.TemporaryDirectory(prefix="pivotmap-publish-") as tmp:
        folder = Path(tmp) if storage.is_remote(ws.root) else storage.local_path(ws.products_url)
        layers = extra_layers(ws, predict.model, Path(tmp))
        out = publish_products(
            maps, nomenclature, provenance, folder, version=version, layers=layers,
            **publish_options(ws.config),
        )  # fmt: skip
        if storage.is_remote(ws.root):
            out |= _upload_run_products(folder, version, ws.products_url)
        if target := ws.config.publish.target:
            with request_slot("s3-requests"):  # uploads are sequential: one slot per mirror
                out["mirror"] = mirror_published(folder, version, target)
            out["catalog"] = out["mirror"]["target"].rstrip("/") + "/catalog.json"
        if dsn := ws.config.publish.stac_api:
            from pivotmap.tasks.pgstac_server import publish_to_stac_api

            out["stac_api"] = publish_to_stac_api(dsn, folder, ws.config.publish.base_url)
    out |= {"duration_s": round(time.monotonic() - started, 2)}
    return PublishResult(published=True, quality=quality, **out)


def map_nomenclature(ws: Workspace) -> Nomenclature:
    """The maps' legend: `labels.nomenclature`, else the one predict left beside the weights of
    the model it used (`predict.model_uri`: a model trained in another run, no labels here)."""
    import yaml

    from pivotmap.tasks.nomenclature import load_nomenclature

    if ws.config.labels is not None:
        return load_nomenclature(ws.config.labels.nomenclature)
    model = ws.read_result(PredictResult).model
    url = storage.join(ws.model_url(model.name, model.version), "nomenclature.yaml")
    try:
        return Nomenclature.model_validate(yaml.safe_load(storage.read_bytes(url)))
    except FileNotFoundError:
        raise PublishError(
            f"the run config has no labels and model {model.name} v{model.version} carries no "
            f"nomenclature ({url}): set labels.nomenclature to the legend it was trained with"
        ) from None


def load_maps(ws: Workspace) -> list[TileMap]:
    """The predicted tiles of the region (npz at `ws.map_url(tile)`), as TileMaps."""
    maps = []
    for tile in ws.tiles():
        url = ws.map_url(tile.id)
        try:
            raw = storage.read_bytes(url)
        except FileNotFoundError as exc:
            raise StageNotRun(f"{url} is missing: run the 'predict' stage first") from exc
        with np.load(io.BytesIO(raw)) as data:
            maps.append(TileMap(tile.id, tile.geobox, data["classes"], data["confidence"]))
    return maps


def gate_maps(ws: Workspace, maps: Sequence[TileMap], nomenclature: Nomenclature):
    """The map quality suite (`tasks.quality.validate_map`) over every tile of the run."""
    from pivotmap.tasks.quality import validate_map

    return validate_map(
        np.concatenate([m.classes.ravel() for m in maps]),
        np.concatenate([m.confidence.ravel() for m in maps]),
        nomenclature,
        max_nodata_fraction=ws.config.publish.max_nodata_fraction,
        previous_fraction=previous_shares(ws.products_url),
        max_share_change=ws.config.publish.max_share_change,
    )


def previous_shares(products_url: str) -> dict[str, float] | None:
    """Class shares (of mapped pixels) of the version catalog.json serves now, if any."""
    catalog = storage.read_text_or_none(storage.join(products_url, "catalog.json"))
    version = served_version(json.loads(catalog)) if catalog is not None else None
    if version is None:
        return None
    areas = storage.read_text_or_none(storage.join(products_url, version, "class_areas.json"))
    if areas is None:
        return None
    counts = {str(c["code"]): c["pixels"] for c in json.loads(areas)["classes"]}
    total = sum(counts.values()) or 1
    return {code: n / total for code, n in counts.items()}


def product_version(model_version: str, cube_version: str, shift_days: int = 0) -> str:
    """Same model on the same cube (and the same calendar shift) → same version, so
    re-publishing is idempotent; maps made with the series moved say by how much (`-s-30d`)."""
    shift = f"-s{shift_days}d" if shift_days else ""
    return f"m{model_version}-c{cube_version[:8]}{shift}"


def build_provenance(
    config: RunConfig,
    ingest: IngestResult,
    pivot: PivotResult,
    model: ModelRef,
    nomenclature: Nomenclature,
    calendar_shift_days: int = 0,
) -> Provenance:
    """Where the maps came from: the model, the cube and the inputs of this run."""
    from pivotmap import __version__

    return Provenance(
        model_name=model.name,
        model_version=model.version,
        model_run_id=model.run_id,
        model_uri=model.uri,
        cube_url=pivot.cube,
        cube_version=pivot.cube_version,
        period_start=config.period.start.isoformat(),
        period_end=config.period.end.isoformat(),
        source_item_count=sum(m.items_used for m in ingest.modalities.values()),
        source_collections=[m.collection for m in ingest.modalities.values()],
        software_version=__version__,
        config_hash=config.config_hash(),
        model_card=model_card(config, model, nomenclature),
        calendar_shift_days=calendar_shift_days,
    )


def model_card(config: RunConfig, model: ModelRef, nomenclature: Nomenclature) -> dict[str, Any]:
    """MLM extension fields of the model that made the maps (what a reader needs to find it,
    load it and feed it: per-pixel cube series in, class scores out)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "unknown"
    classes = stac_products.classification_classes(nomenclature)[:-1]  # no nodata class
    return {
        "mlm:name": model.name,
        "mlm:architecture": "pivotmap temporal encoders (one per modality) with fusion",
        "mlm:tasks": ["classification", "semantic-segmentation"],
        "mlm:framework": "PyTorch",
        "mlm:framework_version": torch_version,
        "mlm:pretrained": False,
        "mlm:input": [{
            "name": "pixel time series",
            "bands": [],
            "input": {"shape": [-1, -1, -1], "dim_order": ["batch", "time", "channel"],
                      "data_type": "float32"},
            "description": f"Per pixel, the pivot cube's S2 and S1 series with their dates, "
            f"sampled every {config.train.step_days} days; the model does its own preprocessing.",
        }],
        "mlm:output": [{
            "name": "class",
            "tasks": ["classification"],
            "result": {"shape": [-1, len(classes)], "dim_order": ["batch", "class"],
                       "data_type": "float32"},
            "description": "Class scores per pixel; the map holds the arg-max code.",
            **({"classification:classes": classes} if classes else {}),
        }],
    }  # fmt: skip


def publish_options(config: RunConfig) -> dict[str, Any]:
    """The `publish_products` keywords a run config sets."""
    start, end = config.period.start.year, config.period.end.year
    years = str(start) if start == end else f"{start}–{end}"
    p = config.publish
    return {
        "collection_id": config.collection_id,
        "title": f"Land cover {config.name} {years}",
        "schema_dir": Path(p.schema_dir) if p.schema_dir else None,
        "validation": p.validation,
        "license": p.license,
        "providers": p.providers,
        "mosaic_cog": p.mosaic_cog,
        "base_url": p.base_url,
    }


def extra_layers(ws: Workspace, model: ModelRef, scratch: Path) -> dict[str, list[LayerFile]]:
    """Concept maps and explanation layers of this model version, by tile id (issue 9); older
    or missing ones are left out. Layers in a remote run folder are fetched into `scratch`."""
    layers: dict[str, list[LayerFile]] = {}
    for result in (ws.find_result(ConceptResult), ws.find_result(ExplainResult)):
        if result is None or result.model is None or result.model.version != model.version:
            continue
        for tile_id, files in result.layers.items():
            found = [_local_layer(raw, scratch) for raw in files]
            layers.setdefault(tile_id, []).extend(found)
    return layers


def _local_layer(raw: Mapping[str, Any], scratch: Path) -> LayerFile:
    """A layer with a local path: a file on s3:// is copied into `scratch` first."""
    url = str(raw["path"])
    if not storage.is_remote(url):
        return LayerFile.from_dict(raw)
    local = scratch / "layers" / url.rsplit("/", 1)[-1]
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(storage.read_bytes(url))
    return LayerFile.from_dict({**raw, "path": str(local)})


def _upload_run_products(folder: Path, version: str, products_url: str) -> dict[str, Any]:
    """Mirror a version staged in `folder` to the run folder's products (objects, then catalog)."""
    with request_slot("s3-requests"):
        stats = mirror_published(folder, version, products_url)
    return {
        "collection": storage.join(products_url, version, "collection.json"),
        "catalog": storage.join(products_url, "catalog.json"),
        "already_published": stats["uploaded"] == 0,
    }
