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


MAX_ITEM_ROWS = 200  # skipped items listed by name; the rest are counted


def skipped_items_artifact(result: IngestResult, limit: int = MAX_ITEM_ROWS) -> None:
    """The skipped items and their reasons as a table in the Prefect UI (at most `limit` rows;
    a last row says how many more reports/ingest.json lists)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        skipped_item_rows(result, limit),
        key="ingest-skipped-items",
        description="STAC items left out of the obs cubes, with the reason",
    )


def skipped_item_rows(result: IngestResult, limit: int = MAX_ITEM_ROWS) -> list[dict]:
    """Rows of the skipped-items table, read failures first, capped at `limit`."""
    rows = [
        {"modality": m, "stage": s.get("stage", "check"), "item": s["item"], "reason": s["reason"]}
        for m, v in result.modalities.items()
        for s in v.skipped_items
    ]
    if not rows:
        return [{"modality": "", "stage": "", "item": "", "reason": "no item skipped"}]
    rows.sort(key=lambda r: r["stage"] != "read")  # stable: failed reads first
    if len(rows) > limit:
        more = len(rows) - limit
        rows = rows[:limit] + [{"modality": "", "stage": "", "item": f"… {more} more",
                                "reason": "every skipped item is in reports/ingest.json"}]  # fmt: skip
    return rows
