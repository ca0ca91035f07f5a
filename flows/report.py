"""The run report and stage artifacts, rendered from typed results, in Prefect and the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pivotmap.results import (
    ConceptResult,
    ExplainResult,
    IngestResult,
    PivotResult,
    PredictResult,
    ProduceResult,
    PublishResult,
    R,
    SampleResult,
    StageNotRun,
    StageResult,
    TrainResult,
)
from pivotmap.tasks import storage

if TYPE_CHECKING:
    from pivotmap.tasks.workspace import Workspace


def run_report_markdown(run: ProduceResult) -> str:
    """Markdown for people: inputs, quality, accuracy, model and where the products are."""
    lines = [
        f"# pivotmap run `{run.config}`",
        "",
        f"- tiles: {run.tiles}; items used: {run.items_used}; skipped: {run.items_skipped}",
        f"- cube: `{run.cube}` (version `{run.cube_version}`)",
        f"- map made with model `{run.mlflow['model']}` v{run.mlflow['model_version']}"
        f" (MLflow run `{run.mlflow['run_id']}`)",
        f"- products: version `{run.product_version}`, catalogue `{run.stac_catalog}`",
        f"- map: `{run.map}`; quicklook: `{run.quicklook}`",
    ]
    if run.overall_accuracy is not None:
        lines += [
            "",
            "## Accuracy on spatially held-out labels",
            "",
            f"Scores of {_trained_model(run)}.",
            "",
            *_not_mapped_with(run),
            "| overall accuracy | macro-F1 | kappa |",
            "|---|---|---|",
            f"| {run.overall_accuracy:.3f} | {run.macro_f1:.3f} | {run.kappa:.3f} |",
            "",
            "| class | F1 |",
            "|---|---|",
            *[f"| {code} | {f1:.3f} |" for code, f1 in (run.per_class_f1 or {}).items()],
            "",
            f"Champion: {run.promotion_reason}",
        ]
    lines += _insight_lines(run)
    return "\n".join(lines) + "\n"


def _trained_model(run: ProduceResult) -> str:
    """The model trained in this run, as people name it (its scores are the report's)."""
    version = run.mlflow.get("trained_version") or run.mlflow["model_version"]
    return f"`{run.mlflow['model']}` v{version}, trained in this run"


def _not_mapped_with(run: ProduceResult) -> list[str]:
    """A warning when the map was made with another version than the one trained here."""
    trained, used = run.mlflow.get("trained_version"), run.mlflow["model_version"]
    if not trained or trained == used:
        return []
    return [
        f"**The map was made with v{used} (@champion), not with v{trained}**: v{trained} was "
        f"not promoted ({run.promotion_reason}). To map with it: `pivotmap promote {trained} "
        "--config FILE --out DIR`, then `pivotmap predict` and `pivotmap publish`.",
        "",
    ]


def _insight_lines(run: ProduceResult) -> list[str]:
    """Zero-shot figures and explanations (issue 9), when the run made them."""
    lines = []
    if zs := run.zero_shot:
        lines += [
            "", "## Text alignment (zero-shot)", "",
            f"Top-1 of the class descriptions on held-out pixels: seen classes "
            f"{zs['seen_top1']:.3f}; each class left out of the alignment {zs['heldout_top1']:.3f} "
            f"(chance {zs['chance_top1']:.3f}, {zs['classes']} classes; same protocol with "
            f"shuffled classes {zs['null_heldout_top1']:.3f}; mean rank of the held-out class "
            f"{zs['heldout_mean_rank']:.2f} of {zs['classes']}).",
        ]  # fmt: skip
    if ex := run.explanations:
        plot = Path(ex["plot"]).name
        lines += ["", "## Explanations", "", f"![attributions]({plot})", ""]
        lines += [f"Method: {ex['method']}.", ""]
        lines += ["| class | dominant variable | dominant month |", "|---|---|---|"]
        lines += [
            f"| {name} | {var} | {ex['dominant_month_per_class'].get(name, '')} |"
            for name, var in ex["dominant_variable_per_class"].items()
        ]
    return lines


def publish_run_report(ws: Workspace, run: ProduceResult, stages: Sequence[StageResult]) -> str:
    """Write reports/run-report.md and attach it, with the class-area and per-tile tables, to
    the Prefect flow run; returns the report's URL."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = run_report_markdown(run) + operations_markdown(ws, run, stages)
    url = ws.write_report_file("run-report.md", markdown)
    create_markdown_artifact(
        markdown, key=f"run-report-{run.config}", description="pivotmap run report"
    )
    publish = _find(stages, PublishResult)
    create_table_artifact(
        class_area_rows(publish)
        or [{"code": "", "name": "no class areas", "pixels": 0, "area_km2": 0.0}],
        key=f"class-areas-{run.config}",
        description=f"Class areas of the published map {run.product_version}",
    )
    create_table_artifact(
        tile_status_rows(stages),
        key=f"tile-status-{run.config}",
        description="Per tile and stage: written in this run, or skipped and why",
    )
    return url


# ---------------------------------------------------------------------------- run summary
def run_summary(ws: Workspace, stages: Sequence[StageResult], seconds: float) -> ProduceResult:
    """The one summary a user or a script reads after a run: where everything is, how good it is."""
    from pivotmap.models.registry import tracking_uri_for

    ingest, pivot = stage_of(stages, IngestResult), stage_of(stages, PivotResult)
    predict, publish = stage_of(stages, PredictResult), stage_of(stages, PublishResult)
    assert publish.version and publish.catalog, "produce runs after a successful publish"
    trained = _find(stages, TrainResult)
    version_url = storage.join(ws.products_url, publish.version)
    return ProduceResult(
        config=ws.config.name,
        config_hash=ws.config.config_hash(),
        period=f"{ws.config.period.start}/{ws.config.period.end}",
        tiles=len(ingest.tiles),
        items_used={m: v.items_used for m, v in ingest.modalities.items()},
        items_skipped={m: len(v.skipped_items) for m, v in ingest.modalities.items()},
        cube=pivot.cube,
        cube_version=pivot.cube_version,
        map=storage.join(version_url, "mosaic_class.vrt"),
        quicklook=storage.join(version_url, "quicklook.png"),
        stac_catalog=publish.catalog,
        product_version=publish.version,
        mlflow={
            "tracking_uri": tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri),
            "model": predict.model.name,
            "model_version": predict.model.version,
            "run_id": predict.model.run_id,
            **({"trained_version": trained.model_version} if trained else {}),
        },
        duration_s=round(seconds, 1),
        **_training_fields(trained),
        **_insight_fields(trained, _find(stages, ConceptResult), _find(stages, ExplainResult)),
    )


def stage_of(stages: Sequence[StageResult], kind: type[R]) -> R:
    """The result of stage `kind` among a run's results; StageNotRun when it is not there."""
    found = _find(stages, kind)
    if found is None:
        raise StageNotRun(f"the run has no '{kind.STAGE}' result")
    return found


def _find(stages: Sequence[StageResult], kind: type[R]) -> R | None:
    return next((s for s in stages if isinstance(s, kind)), None)


def _training_fields(trained: TrainResult | None) -> dict[str, Any]:
    """Scores and promotion of the model trained in this run, if one was."""
    keys = ("overall_accuracy", "macro_f1", "kappa", "per_class_f1", "promoted", "promotion_reason")
    return {k: getattr(trained, k) for k in keys} if trained else {}


def _insight_fields(
    trained: TrainResult | None, concept: ConceptResult | None, explain: ExplainResult | None
) -> dict[str, Any]:
    """Zero-shot figures, concept maps and explanations in the run summary (issue 9)."""
    out: dict[str, Any] = {}
    if trained and (zs := trained.text_alignment):
        keys = ("seen_top1", "heldout_top1", "chance_top1", "null_heldout_top1")
        out["zero_shot"] = {k: zs[k] for k in (*keys, "heldout_mean_rank", "classes")}
    if concept:
        out["concept_maps"] = concept.prompts if concept.skipped is None else concept.skipped
    if explain:
        keys = ("plot", "saliency", "pixels_explained", "dominant_variable_per_class")
        out["explanations"] = {
            k: getattr(explain, k) for k in (*keys, "dominant_month_per_class", "method")
        }
    return out


# ---------------------------------------------------------------------------- operations
SKIP_REASON = "already done with the same inputs (cache key {key})"


def tile_status_rows(stages: Sequence[StageResult]) -> list[dict]:
    """One row per (stage, tile): 'written' in this run, or 'skipped' with the reason."""
    rows: list[dict] = []

    def add(stage: str, written: list, reused: list, key: str | None) -> None:
        for tile in written:
            rows.append({"stage": stage, "tile": tile, "status": "written", "reason": ""})
        reason = SKIP_REASON.format(key=key) if key else "already done"
        for tile in reused:
            rows.append({"stage": stage, "tile": tile, "status": "skipped", "reason": reason})

    for result in stages:
        if isinstance(result, IngestResult):
            for modality, m in result.modalities.items():
                written = [t["tile"] for t in m.tiles_written]
                add(f"ingest-{modality}", written, m.tiles_already_done, m.cache_key)
        elif isinstance(result, PivotResult):
            written = [t["tile"] for t in result.tiles_written]
            add("pivot", written, result.tiles_already_done, result.cube_version)
        elif isinstance(result, SampleResult):
            written = [t["tile"] for t in result.tiles_written]
            add("sample", written, result.tiles_already_done, result.key)
        elif isinstance(result, PredictResult):
            written = [t["tile"] for t in result.tiles]
            add("predict", written, result.tiles_already_done, result.cache_key)
    return rows or [{"stage": "", "tile": "", "status": "", "reason": "no tile processed"}]


def class_area_rows(publish: PublishResult | None) -> list[dict]:
    """Class areas of a published version, as table rows."""
    if publish is None or not publish.class_areas:
        return []
    keys = ("code", "name", "pixels", "area_km2")
    return [{k: c[k] for k in keys} for c in publish.class_areas["classes"]]


def operations_markdown(ws: Workspace, run: ProduceResult, stages: Sequence[StageResult]) -> str:
    """Inputs, tiles written and skipped, quality gates (with their HTML) and product links."""
    lines = ["", "## Inputs", ""]
    for ingest in (s for s in stages if isinstance(s, IngestResult)):
        lines += [
            f"- {m}: collection `{v.collection}`, {v.items_used} items used of "
            f"{v.items_found} found, {len(v.skipped_items)} skipped, {v.dates} dates"
            for m, v in ingest.modalities.items()
        ]
    lines.append(f"- period {run.period}; config hash `{run.config_hash}`")
    rows = tile_status_rows(stages)
    written = sum(r["status"] == "written" for r in rows)
    lines += ["", "## Tiles", "", f"{written} stage × tile written, "
              f"{sum(r['status'] == 'skipped' for r in rows)} skipped.", ""]  # fmt: skip
    lines += ["| stage | tile | status | reason |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['tile']} | {r['status']} | {r['reason']} |" for r in rows]
    lines += ["", "## Quality gates", ""]
    for result in stages:
        if isinstance(result, PivotResult | PublishResult) and result.quality:
            lines.append(_quality_line(ws, result.quality))
    lines += ["", "## Products", ""]
    for key in ("stac_catalog", "map", "quicklook"):
        if value := getattr(run, key):
            lines.append(f"- {key}: [{value}]({_uri(value)})")
    return "\n".join(lines) + "\n"


def _quality_line(ws: Workspace, quality: dict) -> str:
    url = write_quality_html(ws, quality)
    verdict = "passed" if quality["success"] else "FAILED"
    failed = [*quality["failed_critical"], *quality["failed_warning"]]
    return (
        f"- `{quality['suite']}`: {verdict}, {quality['evaluated']} expectations"
        f"{'; ' + '; '.join(failed) if failed else ''} — [{url.rsplit('/', 1)[-1]}]({_uri(url)})"
    )


def write_quality_html(ws: Workspace, quality: dict) -> str:
    """reports/quality-<suite>.html: a Great Expectations result as a page people can open;
    returns its URL."""
    from pivotmap.tasks.quality import quality_html

    name = f"quality-{quality['suite'].replace('_', '-')}.html"
    return ws.write_report_file(name, quality_html(quality))


def stage_artifacts(ws: Workspace, result: StageResult) -> None:
    """A stage's Prefect artifacts: its per-tile table and, with a quality gate, its HTML."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name = ws.config.name
    if isinstance(result, TrainResult):
        create_markdown_artifact(
            train_markdown(result), key=f"train-{name}", description="training result"
        )
    if isinstance(result, PivotResult | PublishResult) and result.quality:
        write_quality_html(ws, result.quality)
    if isinstance(result, IngestResult | PivotResult | SampleResult | PredictResult):
        create_table_artifact(
            tile_status_rows([result]),
            key=f"{result.STAGE}-tiles-{name}",
            description=f"{result.STAGE}: tiles written in this run, or skipped and why",
        )


def train_markdown(result: TrainResult) -> str:
    """The trained model in a few lines: scores on held-out blocks, version, promotion."""
    lines = [
        f"# Model `{result.model_name}` v{result.model_version}",
        "",
        f"- overall accuracy {result.overall_accuracy:.3f}, macro-F1 "
        f"{result.macro_f1:.3f}, kappa {result.kappa:.3f} "
        f"({result.n_test_pixels} held-out pixels; {result.split})",
        f"- champion: {result.promotion_reason}",
        f"- MLflow run `{result.run_id}`, model URI `{result.model_uri}`",
        f"- cube version `{result.cube_version}`, device {result.device}",
    ]
    if b := result.baseline:
        lines.append(f"- random-forest baseline: OA {b['overall_accuracy']:.3f}, "
                     f"macro-F1 {b['macro_f1']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _uri(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()
