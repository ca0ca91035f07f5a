"""Publish flow: map quality gate, then COGs, mosaic, quicklook and STAC, switched in atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from pivotmap import __version__
from pivotmap.config import RunConfig
from pivotmap.flows.report import kv, stage_artifacts
from pivotmap.flows.workspace import Workspace
from pivotmap.tasks.nomenclature import load_nomenclature


def product_version(model_version: str, cube_version: str) -> str:
    """Same model on the same cube → same version, so re-publishing is idempotent."""
    return f"m{model_version}-c{cube_version[:8]}"


def _years(config: RunConfig) -> str:
    start, end = config.period.start.year, config.period.end.year
    return str(start) if start == end else f"{start}–{end}"


def previous_shares(products_dir: Path) -> dict[str, float] | None:
    """Class shares (of mapped pixels) of the version catalog.json serves now, if any."""
    catalog = products_dir / "catalog.json"
    if not catalog.is_file():
        return None
    from pivotmap.tasks.publish import served_version

    version = served_version(json.loads(catalog.read_text()))
    areas = products_dir / version / "class_areas.json" if version else None
    if areas is None or not areas.is_file():
        return None
    counts = {str(c["code"]): c["pixels"] for c in json.loads(areas.read_text())["classes"]}
    total = sum(counts.values()) or 1
    return {code: n / total for code, n in counts.items()}


def extra_layers(ws: Workspace, model: dict) -> dict:
    """Concept maps and explanation layers of this model version, by tile id (issue 9); older
    or missing ones are left out."""
    from pivotmap.tasks.concept_products import LayerFile

    layers: dict[str, list] = {}
    for stage in ("concept", "explain"):
        path = ws.reports_dir / f"{stage}.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        if report.get("model", {}).get("version") != model["version"]:
            continue
        for tile_id, files in report.get("layers", {}).items():
            layers.setdefault(tile_id, []).extend(LayerFile.from_dict(f) for f in files)
    return layers


def load_maps(ws: Workspace):
    from pivotmap.tasks.publish import TileMap

    maps = []
    for tile in ws.tiles():
        path = ws.maps_dir / f"{tile.id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the 'predict' stage first")
        with np.load(path) as data:
            maps.append(
                TileMap(
                    tile_id=tile.id,
                    geobox=tile.geobox,
                    classes=data["classes"],
                    confidence=data["confidence"],
                )
            )
    return maps


@flow(name="publish")
def publish_flow(config: RunConfig, out_dir: str) -> dict:
    """Gate the maps with the quality suite, then publish them; nothing is published on failure."""
    from pivotmap.tasks.publish import Provenance, publish_products
    from pivotmap.tasks.quality import validate_map

    started = time.monotonic()
    logger = get_run_logger()
    ws = Workspace.open(config, out_dir)
    nomenclature = load_nomenclature(config.labels.nomenclature)
    maps = load_maps(ws)
    quality = validate_map(
        np.concatenate([m.classes.ravel() for m in maps]),
        np.concatenate([m.confidence.ravel() for m in maps]),
        nomenclature,
        max_nodata_fraction=config.publish.max_nodata_fraction,
        previous_fraction=previous_shares(ws.products_dir),
        max_share_change=config.publish.max_share_change,
    )
    if not quality.success:
        failed = {"stage": "publish", "published": False, "quality": quality.to_dict()}
        ws.write_report("publish", failed)
        stage_artifacts("publish", failed, config.name, ws.reports_dir)
        quality.raise_for_failure()
    ingest, pivot, predict = (ws.read_report(s) for s in ("ingest", "pivot", "predict"))
    model = predict["model"]
    provenance = Provenance(
        model_name=model["name"],
        model_version=str(model["version"]),
        model_run_id=model["run_id"],
        model_uri=model["uri"],
        cube_url=pivot["cube"],
        cube_version=pivot["cube_version"],
        period_start=config.period.start.isoformat(),
        period_end=config.period.end.isoformat(),
        source_item_count=sum(m["items_used"] for m in ingest["modalities"].values()),
        source_collections=[m["collection"] for m in ingest["modalities"].values()],
        software_version=__version__,
        config_hash=config.config_hash(),
    )
    version = product_version(str(model["version"]), pivot["cube_version"])
    result = publish_products(
        maps,
        nomenclature,
        provenance,
        ws.products_dir,
        collection_id=config.collection_id,
        title=f"Land cover {config.name} {_years(config)}",
        version=version,
        schema_dir=Path(config.publish.schema_dir) if config.publish.schema_dir else None,
        validation=config.publish.validation,
        license=config.publish.license,
        providers=config.publish.providers,
        mosaic_cog=config.publish.mosaic_cog,
        layers=extra_layers(ws, model),
    )
    if config.publish.target:
        from pivotmap.flows.deploy import request_slot
        from pivotmap.tasks.publish import mirror_published

        with request_slot("s3-requests"):  # uploads are sequential: one slot per mirror
            result["mirror"] = mirror_published(ws.products_dir, version, config.publish.target)
        result["catalog"] = result["mirror"]["target"].rstrip("/") + "/catalog.json"
    logger.info(kv("publish", collection=config.collection_id, version=version,
                   catalog=result["catalog"], quality="passed"))  # fmt: skip
    summary = {
        "stage": "publish",
        "published": True,
        "version": version,
        "quality": quality.to_dict(),
        **{k: v for k, v in result.items() if k != "version"},
        "duration_s": round(time.monotonic() - started, 2),
    }
    ws.write_report("publish", summary)
    stage_artifacts("publish", summary, config.name, ws.reports_dir)
    return summary
