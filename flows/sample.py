"""Sample flow: labels + pivot cube → the training table (Parquet, one file per tile).

The stage itself is `tasks.sampling.sample`; the flow runs it and shows its tiles in the UI.
"""

from __future__ import annotations

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.results import SampleResult
from pivotmap.tasks.sampling import sample
from pivotmap.tasks.workspace import Workspace


@flow(name="sample")
def sample_flow(config: RunConfig, out_dir: str, force: bool = False) -> SampleResult:
    """Split the reference data by group, draw per-tile quotas, write the training table."""
    ws = Workspace.open(config, out_dir)
    result = sample(ws, force)
    stage_artifacts(ws, result)
    return result
