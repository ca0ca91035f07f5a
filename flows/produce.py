"""Produce flow: ingest → pivot → sample → train → predict → publish, the end-to-end production run."""

from __future__ import annotations

import time

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.concept import concept_maps_flow, explain_flow
from pivotmap.flows.ingest import ingest_flow
from pivotmap.flows.pivot import pivot_flow
from pivotmap.flows.predict import predict_flow
from pivotmap.flows.publish import publish_flow
from pivotmap.flows.report import publish_run_report, run_summary
from pivotmap.flows.sample import sample_flow
from pivotmap.flows.train import train_flow
from pivotmap.results import ProduceResult, StageResult
from pivotmap.tasks.workspace import Workspace


@flow(name="produce")
def produce_flow(
    config: RunConfig, out_dir: str, force: bool = False, train: bool = True
) -> ProduceResult:
    """Run every stage in order; a failed quality gate stops the run before anything is published."""
    started = time.monotonic()
    ws = Workspace.open(config, out_dir)
    stages: list[StageResult] = [
        ingest_flow(config, ws.root, force=force),
        pivot_flow(config, ws.root, force=force),
    ]
    if train and not config.predict.model_uri:  # a registered model from elsewhere maps as is
        stages.append(sample_flow(config, ws.root, force=force))
        stages.append(train_flow(config, ws.root))
    stages.append(predict_flow(config, ws.root))
    if config.concept.prompts:  # concept maps and explanations are published with the map
        stages.append(concept_maps_flow(config, ws.root))
    if config.explain.enabled:
        stages.append(explain_flow(config, ws.root))
    stages.append(publish_flow(config, ws.root))
    run = run_summary(ws, stages, time.monotonic() - started)
    publish_run_report(ws, run, stages)
    return run
