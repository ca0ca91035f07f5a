"""STAC metadata for map products (Items per tile, one Collection per run) and offline validation."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
from odc.geo.geobox import GeoBox
from pystac.validation import JsonSchemaSTACValidator

from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature

log = logging.getLogger(__name__)

# Versions chosen because index.json in shared/stac-schemas holds a local copy of each.
PROJECTION_SCHEMA = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
VERSION_SCHEMA = "https://stac-extensions.github.io/version/v1.2.0/schema.json"
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
ITEM_EXTENSIONS = [PROJECTION_SCHEMA, CLASSIFICATION_SCHEMA, FILE_SCHEMA, PROCESSING_SCHEMA]
COLLECTION_EXTENSIONS = [CLASSIFICATION_SCHEMA, FILE_SCHEMA, PROCESSING_SCHEMA, VERSION_SCHEMA]
VRT_MEDIA_TYPE = "application/xml"  # GDAL VRT has no registered media type; it is XML
# Provider roles a reader looks for (stac-check, STAC best practice); pivotmap adds processor.
PROVIDER_ROLES = ("producer", "licensor", "host")


class OfflineSchemaError(LookupError):
    """A STAC object needs a JSON schema that the local schema folder does not hold."""


@dataclass(frozen=True)
class RunMetadata:
    """What every Item and the Collection of one published run share."""

    period_start: str
    period_end: str
    software_version: str
    lineage: str
    properties: Mapping[str, Any]  # provenance fields, e.g. pivotmap:model_name
    license: str = "CC-BY-4.0"
    providers: Sequence[pystac.Provider] = field(default_factory=tuple)
    model: Mapping[str, Any] = field(default_factory=dict)  # mlm:* fields of the model
    base_url: str | None = None  # public URL of the products folder, for `self` links


def item_id(tile_id: str) -> str:
    """A tile's Item id: lowercase, as STAC search best practice wants (tile ids are mixed case).

    The tile's folder and COG names keep the tile id, so links and downloads stay as before.
    """
    return tile_id.lower()


def public_ref(url: str) -> str:
    """What a downloader may see of a producer's location: remote URLs as they are, a local
    path or file:// URL by its last name only (a local path helps no one and discloses)."""
    # Any URI scheme but file: (s3://, https://, models:/ of MLflow); one letter is a drive.
    if re.match(r"^[a-z][a-z0-9+.-]+:", url) and not url.startswith("file:"):
        return url
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def multihash_sha256(path: Path) -> str:
    """Multihash of a file's SHA-256 (`1220` + hex digest), as `file:checksum` expects."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "1220" + digest.hexdigest()


def file_asset(
    path: Path, href: str, media_type: str, roles: list[str], title: str
) -> pystac.Asset:
    """An Asset for a written file, carrying its `file:size` and `file:checksum`."""
    fields = {"file:size": path.stat().st_size, "file:checksum": multihash_sha256(path)}
    return pystac.Asset(
        href=href, media_type=media_type, roles=roles, title=title, extra_fields=fields
    )


def _class_slug(name: str, code: int) -> str:
    """Classification v2 `name` allows only [0-9A-Za-z-_]; the display name goes in `title`."""
    slug = re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_").lower()
    return slug or f"class_{code}"


def classification_classes(
    nomenclature: Nomenclature, counts: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """`classification:classes` for the legend plus the nodata code; counts when given."""
    total = int(counts.sum()) if counts is not None else 0
    classes: list[dict[str, Any]] = []
    for cls in nomenclature.classes:
        entry: dict[str, Any] = {
            "value": cls.code,
            "name": _class_slug(cls.name, cls.code),
            "title": cls.name,
            "description": cls.description,
            "color_hint": cls.color.lstrip("#").upper(),
        }
        if counts is not None and total:
            entry["count"] = int(counts[cls.code])
            entry["percentage"] = round(100 * int(counts[cls.code]) / total, 4)
        classes.append(entry)
    nodata: dict[str, Any] = {
        "value": NODATA_CODE,
        "name": "nodata",
        "title": "No data",
        "nodata": True,
    }
    if counts is not None and total:
        nodata["count"] = int(counts[NODATA_CODE])
    classes.append(nodata)
    return classes


def _rounded(value: Any, digits: int = 8) -> Any:
    """Coordinates rounded so Items stay short and do not carry float noise."""
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return round(float(value), digits)


def _footprint_4326(geobox: GeoBox) -> tuple[dict[str, Any], list[float]]:
    """Tile outline in EPSG:4326 (corners only: tiles are small) and its bbox."""
    x0, y0, x1, y1 = geobox.extent.boundingbox
    if geobox.crs is None:
        raise ValueError("tile grid has no CRS: a published tile needs a georeferenced grid")
    to_4326 = geobox.crs.transformer_to_crs("EPSG:4326")
    # Counter-clockwise, as GeoJSON wants; a conformal grid projection keeps the orientation.
    lon, lat = to_4326(np.array([x0, x1, x1, x0, x0]), np.array([y0, y0, y1, y1, y0]))
    ring = _rounded(np.column_stack([lon, lat]).tolist())
    geometry = {"type": "Polygon", "coordinates": [ring]}
    return geometry, _rounded([lon.min(), lat.min(), lon.max(), lat.max()])


def _iso(value: str, *, end: bool = False) -> datetime:
    """An ISO date or datetime as UTC; a bare end date means the end of that day (inclusive)."""
    moment = datetime.fromisoformat(value)
    if end and len(value) == 10:
        moment = moment.replace(hour=23, minute=59, second=59)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _period(run: RunMetadata) -> tuple[datetime, datetime]:
    """The run's period as UTC datetimes; errors if it is empty or not ISO."""
    try:
        start, end = _iso(run.period_start), _iso(run.period_end, end=True)
    except ValueError as exc:
        raise ValueError(
            f"period {run.period_start!r}..{run.period_end!r} is not ISO 8601: {exc}"
        ) from exc
    if end < start:
        raise ValueError(f"period_end {run.period_end} is before period_start {run.period_start}")
    return start, end


def _processing_fields(run: RunMetadata) -> dict[str, Any]:
    return {
        "processing:software": {"pivotmap": run.software_version},
        "processing:lineage": run.lineage,
    }


def _projection_fields(geobox: GeoBox) -> dict[str, Any]:
    if geobox.crs is None:
        raise ValueError("tile grid has no CRS: a published tile needs a georeferenced grid")
    epsg = geobox.crs.epsg
    return {
        "proj:code": f"EPSG:{epsg}" if epsg is not None else None,
        **({} if epsg is not None else {"proj:wkt2": geobox.crs.to_wkt()}),
        "proj:shape": [geobox.height, geobox.width],
        "proj:transform": _rounded(list(geobox.affine)[:6]),
        "proj:bbox": _rounded(list(geobox.extent.boundingbox)),
    }


def uint8_band(name: str, description: str, **extra: Any) -> dict[str, Any]:
    """A STAC 1.1 `bands` entry of a uint8 band with nodata 255, which odc-stac and GDAL-based
    readers use to decode the band (without it odc-stac loads float32 with no nodata)."""
    return {
        "name": name, "description": description, "data_type": "uint8", "nodata": NODATA_CODE,
        **extra,
    }  # fmt: skip


def class_band(nomenclature: Nomenclature) -> dict[str, Any]:
    """The `bands` entry of a class map: uint8, nodata 255, and its legend."""
    return uint8_band(
        "class",
        f"Land-cover class code ({nomenclature.name}); {NODATA_CODE} is no data.",
        **{"classification:classes": classification_classes(nomenclature)},
    )


def confidence_band() -> dict[str, Any]:
    """The `bands` entry of the confidence map: percent 0..100, nodata 255."""
    return uint8_band(
        "confidence", "Model confidence in the mapped class, 0-100 percent.", unit="%"
    )


def class_asset(
    path: Path, href: str, nomenclature: Nomenclature, counts: np.ndarray
) -> pystac.Asset:
    """The class COG asset with its legend and per-class pixel counts."""
    asset = file_asset(path, href, pystac.MediaType.COG, ["data"], "Land-cover class")
    asset.extra_fields["classification:classes"] = classification_classes(nomenclature, counts)
    asset.extra_fields["bands"] = [class_band(nomenclature)]
    return asset


def confidence_asset(path: Path, href: str) -> pystac.Asset:
    """The confidence COG asset (percent 0..100, nodata 255)."""
    asset = file_asset(path, href, pystac.MediaType.COG, ["data", "metadata"], "Confidence (%)")
    asset.description = "Model confidence in the mapped class, 0-100 percent; 255 is no data."
    asset.extra_fields["bands"] = [confidence_band()]
    return asset


def mosaic_asset(
    path: Path, href: str, media_type: str, title: str, nomenclature: Nomenclature
) -> pystac.Asset:
    """A class mosaic asset (VRT or COG): the legend and the class band like a tile's."""
    asset = file_asset(path, href, media_type, ["data"], title)
    asset.extra_fields["classification:classes"] = classification_classes(nomenclature)
    asset.extra_fields["bands"] = [class_band(nomenclature)]
    return asset


def build_tile_item(
    tile_id: str, geobox: GeoBox, assets: Mapping[str, pystac.Asset], run: RunMetadata
) -> pystac.Item:
    """One Item per tile: footprint, period, projection, processing and provenance fields.

    `datetime` is the period's start as a nominal time (stac-check flags a null one, and many
    clients search on it); `start_datetime`/`end_datetime` give the period the map describes.
    """
    geometry, bbox = _footprint_4326(geobox)
    start, end = _period(run)
    item = pystac.Item(
        id=item_id(tile_id),
        geometry=geometry,
        bbox=bbox,
        datetime=start,
        start_datetime=start,
        end_datetime=end,
        properties={**_projection_fields(geobox), **_processing_fields(run), **run.properties},
        stac_extensions=list(ITEM_EXTENSIONS),
    )
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def _processor(run: RunMetadata) -> pystac.Provider:
    """pivotmap as processor; processing v1.2 wants its fields on a producer/processor."""
    return pystac.Provider(
        name="pivotmap",
        roles=[pystac.ProviderRole.PROCESSOR],
        description="Land-cover mapping from Sentinel-1/2 time series",
        extra_fields=_processing_fields(run),
    )


def providers(run: RunMetadata) -> list[pystac.Provider]:
    """The configured providers plus pivotmap (processor); warns when none is the producer,
    licensor or host (users need to know whom the map is from and under what terms)."""
    found = {role for p in run.providers for role in (p.roles or [])}
    if missing := [role for role in PROVIDER_ROLES if role not in found]:
        log.warning(
            "publish.providers names no provider with role(s) %s: add who produces, licenses "
            "and hosts the maps, e.g. {name: My agency, roles: [producer, licensor, host]}",
            missing,
        )
    return [*run.providers, _processor(run)]


def _summaries(items: Sequence[pystac.Item], nomenclature: Nomenclature) -> dict[str, Any]:
    """Collection summaries. Each is an object (a JSON Schema or a range): the MLM v1.4.0
    schema rejects any summary that is not an object, so plain value lists are not used."""
    codes = sorted({str(item.properties.get("proj:code")) for item in items})
    gsd = sorted({abs(float(item.properties["proj:transform"][0])) for item in items})
    return {
        "proj:code": {"type": "string", "enum": codes},
        "gsd": {"minimum": gsd[0], "maximum": gsd[-1]},
        "pivotmap:class_codes": {"type": "integer", "enum": [*nomenclature.codes, NODATA_CODE]},
    }


def _item_assets(items: Sequence[pystac.Item]) -> dict[str, dict[str, Any]]:
    """`item_assets`: the assets every Item has, as Item-independent templates."""
    keys = set.intersection(*(set(item.assets) for item in items))
    first = items[0].assets
    drop = {"href", "file:size", "file:checksum"}
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        template = {k: v for k, v in first[key].to_dict().items() if k not in drop}
        if "classification:classes" in template:  # per-tile counts do not belong in a template
            template["classification:classes"] = [
                {k: v for k, v in c.items() if k not in ("count", "percentage")}
                for c in template["classification:classes"]
            ]
        out[key] = template
    return out


def model_asset(model: Mapping[str, Any]) -> pystac.Asset:
    """The registered model as an MLM asset: its MLflow URI (`models:/name/version`)."""
    return pystac.Asset(
        href=str(model["uri"]),
        title=f"MLflow model {model['name']} version {model['version']}",
        description="Load with mlflow.pyfunc.load_model(href) against the producer's MLflow "
        "registry; the model does its own preprocessing.",
        roles=["mlm:model"],
        extra_fields={"mlm:artifact_type": "mlflow.pyfunc"},
    )


def build_collection(
    collection_id: str,
    title: str,
    version: str,
    items: Sequence[pystac.Item],
    assets: Mapping[str, pystac.Asset],
    run: RunMetadata,
    nomenclature: Nomenclature,
) -> pystac.Collection:
    """The run's Collection: extent of all Items, summaries, item_assets, run-level assets,
    licence, providers and (MLM extension) the model that made the map."""
    boxes = np.array([item.bbox for item in items], dtype=float)
    spatial = [*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist()]
    extent = pystac.Extent(
        pystac.SpatialExtent([spatial]),
        pystac.TemporalExtent([list(_period(run))]),
    )
    collection = pystac.Collection(
        id=collection_id,
        title=title,
        description=f"{title}: land-cover map version {version}, one Item per grid tile.",
        extent=extent,
        license=run.license,
        providers=providers(run),
        stac_extensions=list(COLLECTION_EXTENSIONS),
        summaries=pystac.Summaries(_summaries(items, nomenclature)),
        extra_fields={
            "version": version,
            "item_assets": _item_assets(items),
            **run.properties,
            **_mlm_fields(run.model),
        },
    )
    if run.model:
        collection.stac_extensions.append(MLM_SCHEMA)
        collection.add_asset("model", model_asset(run.model))
    for key, asset in assets.items():
        collection.add_asset(key, asset)
    for item in items:
        collection.add_item(item, title=f"Tile {item.id}")
    return collection


def _mlm_fields(model: Mapping[str, Any]) -> dict[str, Any]:
    """The mlm:* fields of the model (name, architecture, tasks, input, output…)."""
    return {k: v for k, v in model.items() if k.startswith("mlm:")}


class _OfflineValidator(JsonSchemaSTACValidator):
    """pystac's validator limited to preloaded schemas: a missing one fails, never downloads."""

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        # Overrides the one method through which pystac 1.15 fetches schemas (the registry's
        # retrieve for cross-file $refs goes through it too).
        if schema_uri not in self.schema_cache:
            raise OfflineSchemaError(
                f"no local copy of STAC schema {schema_uri}: add it to the schema folder's "
                "index.json, or use an extension version that is there"
            )
        return self.schema_cache[schema_uri]


def offline_validator(schema_dir: Path) -> JsonSchemaSTACValidator:
    """A validator preloaded with every schema listed in `schema_dir/index.json`."""
    index = Path(schema_dir) / "index.json"
    if not index.is_file():
        raise OfflineSchemaError(
            f"{index} not found: point schema_dir at a STAC schema folder such as shared/stac-schemas"
        )
    validator = _OfflineValidator()
    for url, relative in json.loads(index.read_text(encoding="utf-8")).items():
        validator.schema_cache[url] = json.loads(
            (index.parent / relative).read_text(encoding="utf-8")
        )
    return validator


def _stac_objects(obj: pystac.STACObject) -> list[pystac.STACObject]:
    """`obj` and, for a catalogue or collection, every child and item below it."""
    if not isinstance(obj, pystac.Catalog):
        return [obj]
    objects: list[pystac.STACObject] = []
    for catalog, _, items in obj.walk():
        objects.append(catalog)
        objects.extend(items)
    return objects


def validate_offline(obj: pystac.STACObject, schema_dir: Path) -> int:
    """Validate `obj` and everything below it against local schemas; returns the object count.

    Raises:
        pystac.errors.STACValidationError: an object breaks its core or extension schema.
        OfflineSchemaError: a schema is not in `schema_dir` (nothing is fetched).
    """
    validator = offline_validator(schema_dir)
    objects = _stac_objects(obj)
    for stac_object in objects:
        stac_object.validate(validator=validator)
    return len(objects)
