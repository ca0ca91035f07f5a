"""Predict flow: a registered model over every tile of the pivot cube → class and confidence.

The model is `predict.model_uri` (any registered version, on the tracking server of
`mlflow.tracking_uri`: a model trained in another run maps this region with no labels here), else
the run's own model at `predict.model_alias`; it must have learnt from a cube built like this one.

The stage itself is `models.inference.predict`: tiles run in parallel on Dask (local CPUs, one
worker per GPU with dask-cuda, or an existing cluster), each streamed in windows; the flow runs
it and shows its result in the Prefect UI. Tiles report their progress as they finish
(pivotmap/progress.py: the progress artifact, `progress` log lines with px/s and ETA, failures).
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
    """Resolve the model, check it against the cube and classify every tile not already done."""
    ws = Workspace.open(config, out_dir)
    result = predict(ws, device, force)
    stage_artifacts(ws, result)
    return result
