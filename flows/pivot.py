"""Pivot flow: obs cubes → the daily, gap-filled pivotal cube with information age, then its gate.

The stage itself is `tasks.pivot.build_pivot`; the flow runs it, shows its result in the Prefect
UI and stops the run when the cube fails its quality suite.
"""

from __future__ import annotations

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.results import PivotResult
from pivotmap.tasks.pivot import build_pivot
from pivotmap.tasks.quality import QualityResult
from pivotmap.tasks.workspace import Workspace


@flow(name="pivot")
def pivot_flow(config: RunConfig, out_dir: str, force: bool = False) -> PivotResult:
    """Build, resume or update the pivot cube tile by tile, then run the cube quality suite."""
    ws = Workspace.open(config, out_dir)
    result = build_pivot(ws, force)
    stage_artifacts(ws, result)
    QualityResult.from_dict(result.quality).raise_for_failure()  # after the result is kept
    return result
