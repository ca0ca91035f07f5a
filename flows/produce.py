"""Produce flow: ingest → pivot → train → predict → publish, the end-to-end production run."""

from __future__ import annotations

import time

from prefect import flow

from pivotmap.flows.config import RunConfig
from pivotmap.flows.ingest import ingest_flow
from pivotmap.flows.pivot import pivot_flow
from pivotmap.flows.predict import predict_flow
from pivotmap.flows.publish import publish_flow
from pivotmap.flows.report import publish_run_report
from pivotmap.flows.train import train_flow
from pivotmap.flows.workspace import Workspace


@flow(name="produce")
def produce_flow(config: RunConfig, out_dir: str, force: bool = False, train: bool = True) -> dict:
    """Run every stage in order; a failed quality gate stops the run before anything is published."""
    started = time.monotonic()
    ws = Workspace.open(config, out_dir)
    ingest = ingest_flow(config, str(ws.root), force=force)
    pivot = pivot_flow(config, str(ws.root), force=force)
    trained = train_flow(config, str(ws.root)) if train else None
    predict = predict_flow(config, str(ws.root))
    publish = publish_flow(config, str(ws.root))
    summary = run_summary(ws, ingest, pivot, trained, predict, publish, time.monotonic() - started)
    publish_run_report(summary, ws.reports_dir)
    return summary


def run_summary(ws: Workspace, ingest, pivot, trained, predict, publish, seconds: float) -> dict:
    """The one JSON object a user or a script reads after a run: where everything is, how good it is."""
    from pivotmap.models.registry import tracking_uri_for

    version_dir = ws.products_dir / publish["version"]
    summary = {
        "ok": True,
        "config": ws.config.name,
        "tiles": len(ingest["tiles"]),
        "items_used": {m: v["items_used"] for m, v in ingest["modalities"].items()},
        "items_skipped": {m: len(v["skipped_items"]) for m, v in ingest["modalities"].items()},
        "cube": pivot["cube"],
        "cube_version": pivot["cube_version"],
        "map": str(version_dir / "mosaic_class.vrt"),
        "quicklook": str(version_dir / "quicklook.png"),
        "stac_catalog": publish["catalog"],
        "product_version": publish["version"],
        "mlflow": {
            "tracking_uri": tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri),
            "model": predict["model"]["name"],
            "model_version": predict["model"]["version"],
            "run_id": predict["model"]["run_id"],
        },
        "duration_s": round(seconds, 1),
    }
    if trained:
        summary.update(
            {
                k: trained[k]
                for k in (
                    "overall_accuracy",
                    "macro_f1",
                    "kappa",
                    "per_class_f1",
                    "promoted",
                    "promotion_reason",
                )
            }
        )
    return summary
