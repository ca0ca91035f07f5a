"""Train flow: labels on the grid + pivot cube → a fused S1/S2 classifier, measured and registered.

The stage itself is `models.trainer.train`; here each of its training steps runs as a Prefect
task (on a GPU work pool's worker it trains on CUDA), and the result becomes the run's
artifacts.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, task
from prefect.cache_policies import NONE

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.models.trainer import train
from pivotmap.results import TrainResult
from pivotmap.tasks.workspace import Workspace


def as_task(fn: Callable) -> Callable:
    """A training step as a Prefect task (inputs are arrays and models: nothing to cache)."""
    return task(cache_policy=NONE)(fn)


@flow(name="train")
def train_flow(config: RunConfig, out_dir: str, device: str | None = None) -> TrainResult:
    """Split labels spatially, (pre)train on the pivot cube, compare with a random forest,
    evaluate on held-out blocks, register."""
    ws = Workspace.open(config, out_dir)
    result = train(ws, device, step=as_task)
    stage_artifacts(ws, result)
    return result
