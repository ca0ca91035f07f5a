"""Ingest flow: STAC items → masked, regridded observations on their own dates (`obs` cubes).

The stage itself is `tasks.ingest.ingest`; the flow runs it and shows its result in the Prefect UI.
"""

from __future__ import annotations

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.results import IngestResult
from pivotmap.tasks.ingest import ingest
from pivotmap.tasks.workspace import Workspace


@flow(name="ingest")
def ingest_flow(config: RunConfig, out_dir: str, force: bool = False) -> IngestResult:
    """Search both modalities, check the items and write each tile's observations."""
    ws = Workspace.open(config, out_dir)
    result = ingest(ws, force)
    skipped_items_artifact(result)
    stage_artifacts(ws, result)
    return result


def skipped_items_artifact(result: IngestResult) -> None:
    """The skipped items and their reasons as a table in the Prefect UI."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {"modality": m, "stage": s.get("stage", "check"), "item": s["item"], "reason": s["reason"]}
        for m, v in result.modalities.items()
        for s in v.skipped_items
    ]
    create_table_artifact(
        rows or [{"modality": "", "stage": "", "item": "", "reason": "no item skipped"}],
        key="ingest-skipped-items",
        description="STAC items left out of the obs cubes, with the reason",
    )
