"""Publish a run's maps: stage COGs, mosaic, quicklook, stats and STAC, then swap them in atomically."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pystac
from odc.geo.geobox import GeoBox

from pivotmap.tasks import cog, quicklook, stac_products
from pivotmap.tasks.concept_products import LayerFile, layer_asset
from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature

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

    def stac_properties(self) -> dict[str, Any]:
        """Provenance as `pivotmap:*` STAC fields, on every Item and the Collection."""
        fields = ("model_name", "model_version", "model_run_id", "model_uri", "cube_url")
        props: dict[str, Any] = {f"pivotmap:{name}": getattr(self, name) for name in fields}
        props["pivotmap:cube_version"] = self.cube_version
        props["pivotmap:source_item_count"] = self.source_item_count
        props["pivotmap:source_collections"] = list(self.source_collections)
        props["pivotmap:config_hash"] = self.config_hash
        return props

    def lineage(self) -> str:
        """One sentence for `processing:lineage`."""
        return (
            f"Classes predicted by model {self.model_name} version {self.model_version} "
            f"({self.model_uri}, run {self.model_run_id}) from data cube {self.cube_url} "
            f"version {self.cube_version}, built from {self.source_item_count} items of "
            f"{', '.join(self.source_collections)} between {self.period_start} and {self.period_end}."
        )

    def run_metadata(self) -> stac_products.RunMetadata:
        return stac_products.RunMetadata(
            period_start=self.period_start,
            period_end=self.period_end,
            software_version=self.software_version,
            lineage=self.lineage(),
            properties=self.stac_properties(),
        )


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
        folder / f"{tile.tile_id}_class.tif", tile.classes, tile.geobox, nomenclature.colormap()
    )
    confidence_tif = cog.write_confidence_cog(
        folder / f"{tile.tile_id}_confidence.tif", tile.confidence, tile.geobox
    )
    counts = quicklook.class_counts(tile.classes)
    assets = {
        "class": stac_products.class_asset(class_tif, f"./{class_tif.name}", nomenclature, counts),
        "confidence": stac_products.confidence_asset(confidence_tif, f"./{confidence_tif.name}"),
    }
    for layer in layers:  # concept maps, explanation layers (issue 9)
        copy = folder / f"{tile.tile_id}_{layer.key}.tif"
        shutil.copyfile(layer.path, copy)
        assets[layer.key] = layer_asset(layer, copy, f"./{copy.name}")
    return stac_products.build_tile_item(tile.tile_id, tile.geobox, assets, run)


def _stage_run_products(
    staging: Path,
    maps: Sequence[TileMap],
    nomenclature: Nomenclature,
    title: str,
    mosaic_cog: bool = False,
) -> dict[str, pystac.Asset]:
    """Write the mosaic VRT, quicklook PNG and class-area table; return their assets."""
    classes = [(m.classes, m.geobox) for m in maps]
    sources = [(staging / m.tile_id / f"{m.tile_id}_class.tif", m.geobox) for m in maps]
    vrt = cog.write_mosaic_vrt(staging / "mosaic_class.vrt", sources, nomenclature.colormap())
    png = quicklook.write_quicklook(staging / "quicklook.png", classes, nomenclature, title)
    areas = staging / "class_areas.json"
    table = quicklook.class_areas(classes, nomenclature)
    areas.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    mosaic = stac_products.file_asset(
        vrt, "./mosaic_class.vrt", stac_products.VRT_MEDIA_TYPE, ["data"], "Class mosaic (GDAL VRT)"
    )
    mosaic.extra_fields["classification:classes"] = stac_products.classification_classes(
        nomenclature
    )
    extra = {}
    if mosaic_cog:
        tif = cog.write_mosaic_cog(staging / "mosaic_class.tif", vrt)
        extra["mosaic_cog"] = stac_products.file_asset(
            tif, "./mosaic_class.tif", pystac.MediaType.COG, ["data"], "Class mosaic (COG)"
        )
        extra["mosaic_cog"].extra_fields["classification:classes"] = mosaic.extra_fields[
            "classification:classes"
        ]
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


def _save_collection(collection: pystac.Collection, staging: Path, out_dir: Path) -> None:
    """Save the Collection self-contained; its root link is `../catalog.json` (set at commit)."""
    # A stand-in root at the final catalogue location makes pystac write the root and parent
    # links relative to it; the staging folder and out_dir/<version> are siblings, so they hold.
    root = pystac.Catalog(
        id="root", description="stand-in", catalog_type=pystac.CatalogType.SELF_CONTAINED
    )
    root.set_self_href(str(out_dir / "catalog.json"))
    root.add_child(collection)
    collection.normalize_hrefs(str(staging))
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)


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
    assets = _stage_run_products(staging, maps, nomenclature, title, mosaic_cog)
    collection = stac_products.build_collection(collection_id, title, version, items, assets, run)
    _save_collection(collection, staging, staging.parent)
    return collection


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
    """catalog.json: the entry point, linking to the current version's Collection only."""
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
    return json.dumps(catalog.to_dict(include_self_link=False), indent=2) + "\n"


def served_version(catalog: dict) -> str | None:
    """The version a root catalog.json (as `_root_catalog_text` writes it) serves, or None."""
    child = next((link["href"] for link in catalog["links"] if link["rel"] == "child"), None)
    return Path(child).parent.name if child else None


def _write_root_catalog(out_dir: Path, version: str, collection_id: str, title: str) -> None:
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
) -> dict[str, Any]:
    """Publish `maps` as `out_dir/<version>/` (COGs, mosaic, quicklook, stats, STAC), atomically.

    Re-publishing identical content is a no-op (`already_published`); catalog.json switches to
    the version only once its folder is whole. `validation` is 'offline' (schemas from
    `schema_dir`), 'online' (schemas fetched by pystac) or 'off'; default offline when
    `schema_dir` is given, else off. `layers` adds files (concept maps, explanation layers) as
    assets of the tile Items, by tile id.
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
        )
        collection = _stage(
            staging, maps, nomenclature, run, collection_id=collection_id, title=title,
            version=version, mosaic_cog=mosaic_cog, layers=layers,
        )  # fmt: skip
        if validation == "offline":
            _validate_staged(collection, Path(schema_dir))
        elif validation == "online":
            _validate_online(collection)
        already = _commit(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    # Also on a no-op: a crash between rename and this write must heal on the rerun.
    _write_root_catalog(out_dir, version, collection_id, title)
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
    from pivotmap.tasks import storage

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
