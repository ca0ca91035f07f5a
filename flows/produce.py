"""Produce flow: ingest → pivot → sample → train → predict → publish, the end-to-end production run.

The parent run shows its stages live: a `stage` log line as each starts and ends (with its time
and the run's), a progress artifact (stages done of planned, the one running now) and the
`stages-<name>` table, updated as they go (pivotmap/progress.py StageProgress).
"""

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
from pivotmap.progress import StageProgress
from pivotmap.results import ProduceResult, StageResult
from pivotmap.tasks.workspace import Workspace


def planned_stages(config: RunConfig, train: bool = True) -> list[str]:
    """The stages `produce` runs for `config`, in order."""
    stages = ["ingest", "pivot"]
    if train and not config.predict.model_uri:  # a registered model from elsewhere maps as is
        stages += ["sample", "train"]
    stages.append("predict")
    if config.concept.prompts:  # concept maps and explanations are published with the map
        stages.append("concept")
    if config.explain.enabled:
        stages.append("explain")
    return [*stages, "publish"]


@flow(name="produce")
def produce_flow(
    config: RunConfig, out_dir: str, force: bool = False, train: bool = True
) -> ProduceResult:
    """Run every stage in order; a failed quality gate stops the run before anything is published."""
    started = time.monotonic()
    ws = Workspace.open(config, out_dir)
    root = ws.root
    runs = {
        "ingest": lambda: ingest_flow(config, root, force=force),
        "pivot": lambda: pivot_flow(config, root, force=force),
        "sample": lambda: sample_flow(config, root, force=force),
        "train": lambda: train_flow(config, root),
        "predict": lambda: predict_flow(config, root, force=force),
        "concept": lambda: concept_maps_flow(config, root),
        "explain": lambda: explain_flow(config, root),
        "publish": lambda: publish_flow(config, root),
    }
    planned = planned_stages(config, train)
    progress = StageProgress(config.name, planned, key=f"stages-{config.name}")
    stages: list[StageResult] = [progress.run_stage(name, runs[name]) for name in planned]
    run = run_summary(ws, stages, time.monotonic() - started)
    publish_run_report(ws, run, stages)
    return run
