"""Predict flow: the champion model over every tile of the pivot cube → class and confidence.

The stage itself is `models.inference.predict`: tiles run in parallel on Dask (local CPUs, one
worker per GPU with dask-cuda, or an existing cluster), each streamed in windows; the flow runs
it and shows its result in the Prefect UI.
"""

from __future__ import annotations

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.models.inference import predict
from pivotmap.results import PredictResult
from pivotmap.tasks.workspace import Workspace


@flow(name="predict")
def predict_flow(
    config: RunConfig, out_dir: str, device: str | None = None, force: bool = False
) -> PredictResult:
    """Resolve `models:/<name>@<alias>` and classify every tile not already done."""
    ws = Workspace.open(config, out_dir)
    result = predict(ws, device, force)
    stage_artifacts(ws, result)
    return result
