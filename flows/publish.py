"""Publish flow: map quality gate, then COGs, mosaic, quicklook and STAC, switched in atomically."""

from __future__ import annotations

from prefect import flow

from pivotmap.config import RunConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.results import PublishResult
from pivotmap.runtime import kv, run_logger
from pivotmap.tasks.publish import publish
from pivotmap.tasks.quality import QualityResult
from pivotmap.tasks.workspace import Workspace


@flow(name="publish")
def publish_flow(config: RunConfig, out_dir: str) -> PublishResult:
    """Gate the maps with the quality suite, then publish them; nothing is published on failure."""
    ws = Workspace.open(config, out_dir)
    result = publish(ws)
    ws.write_result(result)
    stage_artifacts(ws, result)
    if not result.published:
        QualityResult.from_dict(result.quality).raise_for_failure()
    run_logger("publish").info(
        kv("publish", collection=config.collection_id, version=result.version,
           catalog=result.catalog, quality="passed")
    )  # fmt: skip
    return result
