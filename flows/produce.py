"""Produce flow: ingest → pivot → train → predict → publish, the end-to-end production run."""

from __future__ import annotations

import time

from prefect import flow

from pivotmap.config import RunConfig
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
    insight = concept_and_explain(config, ws)
    publish = publish_flow(config, str(ws.root))
    summary = run_summary(ws, ingest, pivot, trained, predict, publish, time.monotonic() - started)
    summary |= insight_summary(trained, insight)
    publish_run_report(summary, ws.reports_dir)
    return summary


def concept_and_explain(config: RunConfig, ws: Workspace) -> dict:
    """Concept maps of the configured prompts and the explanation layers, before publishing."""
    from pivotmap.flows.concept import concept_maps_flow, explain_flow

    out = {}
    if config.concept.prompts:
        out["concept"] = concept_maps_flow(config, str(ws.root))
    if config.explain.enabled:
        out["explain"] = explain_flow(config, str(ws.root))
    return out


def insight_summary(trained: dict | None, insight: dict) -> dict:
    """Zero-shot figures, concept maps and explanations in the run summary (issue 9)."""
    out = {}
    if trained and trained.get("text_alignment"):
        zs = trained["text_alignment"]
        keys = ("seen_top1", "heldout_top1", "chance_top1", "null_heldout_top1")
        out["zero_shot"] = {k: zs[k] for k in (*keys, "heldout_mean_rank", "classes")}
    if "concept" in insight:
        out["concept_maps"] = insight["concept"].get("prompts", insight["concept"].get("skipped"))
    if "explain" in insight:
        ex = insight["explain"]
        keys = ("plot", "saliency", "pixels_explained", "dominant_variable_per_class")
        out["explanations"] = {k: ex[k] for k in (*keys, "dominant_month_per_class", "method")}
    return out


def run_summary(ws: Workspace, ingest, pivot, trained, predict, publish, seconds: float) -> dict:
    """The one JSON object a user or a script reads after a run: where everything is, how good it is."""
    from pivotmap.models.registry import tracking_uri_for

    version_dir = ws.products_dir / publish["version"]
    summary = {
        "ok": True,
        "config": ws.config.name,
        "config_hash": ws.config.config_hash(),
        "period": f"{ws.config.period.start}/{ws.config.period.end}",
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
