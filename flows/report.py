"""The run report and stage artifacts, rendered from typed results, in Prefect and the run folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def run_report_markdown(
    run: ProduceResult,
    class_names: dict[str, str] | None = None,
    image: Callable[[str], str] | None = None,
) -> str:
    """Markdown for people: inputs, quality, accuracy, model and where the products are.

    `class_names` labels per-class F1 by class (code → name, from the nomenclature); `image`
    turns a report image's URL into what the markdown links (default: its file name, beside
    the report in reports/; the Prefect artifact embeds it as a data: URI).
    """
    names = class_names or {}
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
            "| class | code | F1 |",
            "|---|---|---|",
            *[
                f"| {names.get(str(code), f'class {code}')} | {code} | {f1:.3f} |"
                for code, f1 in (run.per_class_f1 or {}).items()
            ],
            "",
            f"Champion: {run.promotion_reason}",
        ]
    lines += _insight_lines(run, image or (lambda url: url.rsplit("/", 1)[-1]))
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


def _insight_lines(run: ProduceResult, image: Callable[[str], str]) -> list[str]:
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
        lines += ["", "## Explanations", "", f"![attributions]({image(ex['plot'])})", ""]
        lines += [f"Method: {ex['method']}.", ""]
        lines += ["| class | dominant variable | dominant month |", "|---|---|---|"]
        lines += [
            f"| {name} | {var} | {ex['dominant_month_per_class'].get(name, '')} |"
            for name, var in ex["dominant_variable_per_class"].items()
        ]
    return lines


def publish_run_report(ws: Workspace, run: ProduceResult, stages: Sequence[StageResult]) -> str:
    """Write reports/run-report.md and attach it, with the class-area table and the tile
    summary, to the Prefect flow run; returns the report's URL.

    The file links its images by name (they sit beside it in reports/); the artifact embeds
    them as data: URIs, since the Prefect UI cannot reach the run folder.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    names = class_names(ws, stages)
    operations = operations_markdown(ws, run, stages)
    url = ws.write_report_file("run-report.md", run_report_markdown(run, names) + operations)
    embedded = run_report_markdown(run, names, image=_embedded_or_named) + operations
    create_markdown_artifact(
        embedded, key=f"run-report-{run.config}", description="pivotmap run report"
    )
    publish = _find(stages, PublishResult)
    create_table_artifact(
        class_area_rows(publish)
        or [{"code": "", "name": "no class areas", "pixels": 0, "area_km2": 0.0}],
        key=f"class-areas-{run.config}",
        description=f"Class areas of the published map {run.product_version}",
    )
    create_markdown_artifact(
        tile_status_markdown(stages),
        key=f"tile-status-{run.config}",
        description="Tiles per stage (written, skipped, failed); the tiles not written listed",
    )
    return url


def class_names(ws: Workspace, stages: Sequence[StageResult]) -> dict[str, str]:
    """Class code → name: the published legend, else the run's nomenclature, else none."""
    publish = _find(stages, PublishResult)
    if publish is not None and publish.class_areas:
        return {str(c["code"]): c["name"] for c in publish.class_areas["classes"]}
    labels = ws.config.labels
    if labels is None:
        return {}
    from pivotmap.tasks.nomenclature import load_nomenclature

    try:
        return {str(c.code): c.name for c in load_nomenclature(labels.nomenclature).classes}
    except (OSError, ValueError):  # the report still comes, with codes
        return {}


def _embedded_or_named(url: str) -> str:
    """A report image as a data: URI; its file name if it cannot be read (the report comes)."""
    try:
        return data_uri(url)
    except (OSError, ValueError, storage.StorageError):
        return url.rsplit("/", 1)[-1]


def data_uri(url: str, media_type: str = "image/png") -> str:
    """The file at `url` as a data: URI (for markdown artifacts the UI shows as they are)."""
    import base64

    data = storage.read_bytes(url)
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


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
        out["zero_shot"] = {
            k: zs[k] for k in (*keys, "heldout_mean_rank", "chance_mean_rank", "classes")
        }
        if grounded := zs.get("grounded"):  # descriptions read as descriptor facts (issue 19)
            out["zero_shot"]["grounded"] = {k: v for k, v in grounded.items() if k != "per_class"}
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


MAX_TILE_ROWS = 100  # tiles listed by name per table; the rest are counted
STATUSES = ("written", "skipped", "failed", "no data")


def tile_status_rows(stages: Sequence[StageResult]) -> list[dict]:
    """One row per (stage, tile): 'written' in this run, 'skipped' (already done, with its
    cache key), 'failed' (written without the items whose reads failed) or 'no data'."""
    rows: list[dict] = []

    def add(stage: str, written: list[dict], reused: list, key: str | None, empty=()) -> None:
        no_data = {e["tile"]: e["reason"] for e in empty}
        for info in written:
            tile, failures = info["tile"], info.get("read_failures") or []
            if failures:
                first = f"{failures[0]['item']}: {failures[0]['reason']}"
                reason = f"{len(failures)} item reads failed (first: {first})"
                rows.append({"stage": stage, "tile": tile, "status": "failed", "reason": reason})
            elif tile in no_data:
                rows.append({"stage": stage, "tile": tile, "status": "no data",
                             "reason": no_data[tile]})  # fmt: skip
            else:
                rows.append({"stage": stage, "tile": tile, "status": "written", "reason": ""})
        reason = SKIP_REASON.format(key=key) if key else "already done"
        for tile in reused:
            rows.append({"stage": stage, "tile": tile, "status": "skipped", "reason": reason})

    for result in stages:
        if isinstance(result, IngestResult):
            for modality, m in result.modalities.items():
                add(f"ingest-{modality}", m.tiles_written, m.tiles_already_done, m.cache_key,
                    m.tiles_without_data)  # fmt: skip
        elif isinstance(result, PivotResult):
            add("pivot", result.tiles_written, result.tiles_already_done, result.cube_version)
        elif isinstance(result, SampleResult):
            add("sample", result.tiles_written, result.tiles_already_done, result.key)
        elif isinstance(result, PredictResult):
            add("predict", result.tiles, result.tiles_already_done, result.cache_key)
    return rows


def tile_counts(rows: Sequence[dict]) -> list[dict]:
    """Tiles per stage and status, in stage order."""
    counts: dict[str, dict] = {}
    for row in rows:
        stage = counts.setdefault(row["stage"], {"stage": row["stage"], "tiles": 0,
                                                 **dict.fromkeys(STATUSES, 0)})  # fmt: skip
        stage["tiles"] += 1
        stage[row["status"]] += 1
    return list(counts.values())


def tile_status_markdown(stages: Sequence[StageResult], limit: int = MAX_TILE_ROWS) -> str:
    """Tiles per stage (counts), then the tiles not written in this run, at most `limit` of
    them (failed first), saying how many more there are and where they are all listed."""
    rows = tile_status_rows(stages)
    if not rows:
        return "No tile processed.\n"
    lines = [
        "| stage | tiles | written | skipped | failed | no data |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['stage']} | {c['tiles']} | {c['written']} | {c['skipped']} | {c['failed']} "
        f"| {c['no data']} |"
        for c in tile_counts(rows)
    ]
    order = {"failed": 0, "no data": 1, "skipped": 2}
    issues = sorted((r for r in rows if r["status"] != "written"), key=lambda r: order[r["status"]])
    if not issues:
        return "\n".join([*lines, "", "Every tile was written in this run."]) + "\n"
    lines += ["", "| stage | tile | status | reason |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['tile']} | {r['status']} | {r['reason']} |"
              for r in issues[:limit]]  # fmt: skip
    if len(issues) > limit:
        lines += ["", f"{len(issues) - limit} more tiles not written in this run are not "
                  "listed here; `reports/<stage>.json` in the run folder lists every tile."]  # fmt: skip
    return "\n".join(lines) + "\n"


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
    lines += ["", "## Tiles", "", tile_status_markdown(stages).rstrip("\n")]
    lines += ["", "## Quality gates", ""]
    for result in stages:
        if isinstance(result, PivotResult | PublishResult) and result.quality:
            lines.append(_quality_line(ws, result.quality))
    lines += ["", "## Products", ""]
    for key in ("stac_catalog", "map", "quicklook"):
        if value := getattr(run, key):
            link = product_url(ws, value)
            lines.append(f"- {key}: [{link}]({link})")
    return "\n".join(lines) + "\n"


def product_url(ws: Workspace, url: str) -> str:
    """Where people open a product: under `publish.base_url` when it is set (the products
    folder as served), else its own URL (file:// for a local path)."""
    base, products = ws.config.publish.base_url, ws.products_url.rstrip("/") + "/"
    if base and url.startswith(products):
        return f"{base.rstrip('/')}/{url[len(products) :]}"
    return _uri(url)


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
    from prefect.artifacts import create_markdown_artifact

    name = ws.config.name
    if isinstance(result, TrainResult):
        create_markdown_artifact(
            train_markdown(result), key=f"train-{name}", description="training result"
        )
    if isinstance(result, PivotResult | PublishResult) and result.quality:
        write_quality_html(ws, result.quality)
    if isinstance(result, IngestResult | PivotResult | SampleResult | PredictResult):
        create_markdown_artifact(
            tile_status_markdown([result]),
            key=f"{result.STAGE}-tiles-{name}",
            description=f"{result.STAGE}: tiles written, skipped and failed; those not written",
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
    if e := result.ensemble:
        oa, f1 = e["overall_accuracy"], e["macro_f1"]
        lines.append(f"- ensemble of {e['members']} (seeds {e['seeds']}): members' OA "
                     f"{oa['mean']:.3f} ± {oa['std']:.3f}, macro-F1 {f1['mean']:.3f} ± "
                     f"{f1['std']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _uri(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()
