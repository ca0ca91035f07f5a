"""The run report: a markdown summary and tables, as Prefect artifacts and in the run folder."""

from __future__ import annotations

from pathlib import Path


def run_report_markdown(summary: dict) -> str:
    """Markdown for people: inputs, quality, accuracy, model and where the products are."""
    lines = [
        f"# pivotmap run `{summary['config']}`",
        "",
        f"- tiles: {summary['tiles']}; items used: {summary['items_used']}; skipped: {summary['items_skipped']}",
        f"- cube: `{summary['cube']}` (version `{summary['cube_version']}`)",
        f"- model: `{summary['mlflow']['model']}` v{summary['mlflow']['model_version']}"
        f" (MLflow run `{summary['mlflow']['run_id']}`)",
        f"- products: version `{summary['product_version']}`, catalogue `{summary['stac_catalog']}`",
        f"- map: `{summary['map']}`; quicklook: `{summary['quicklook']}`",
    ]
    if "overall_accuracy" in summary:
        lines += [
            "",
            "## Accuracy on spatially held-out labels",
            "",
            "| overall accuracy | macro-F1 | kappa |",
            "|---|---|---|",
            f"| {summary['overall_accuracy']:.3f} | {summary['macro_f1']:.3f} | {summary['kappa']:.3f} |",
            "",
            "| class | F1 |",
            "|---|---|",
            *[f"| {code} | {f1:.3f} |" for code, f1 in summary["per_class_f1"].items()],
            "",
            f"Champion: {summary['promotion_reason']}",
        ]
    lines += _insight_lines(summary)
    return "\n".join(lines) + "\n"


def _insight_lines(summary: dict) -> list[str]:
    """Zero-shot figures and explanations (issue 9), when the run made them."""
    lines = []
    if zs := summary.get("zero_shot"):
        lines += [
            "", "## Text alignment (zero-shot)", "",
            f"Top-1 of the class descriptions on held-out pixels: seen classes "
            f"{zs['seen_top1']:.3f}; each class left out of the alignment {zs['heldout_top1']:.3f} "
            f"(chance {zs['chance_top1']:.3f}, {zs['classes']} classes; same protocol with "
            f"shuffled classes {zs['null_heldout_top1']:.3f}; mean rank of the held-out class "
            f"{zs['heldout_mean_rank']:.2f} of {zs['classes']}).",
        ]  # fmt: skip
    if ex := summary.get("explanations"):
        plot = Path(ex["plot"]).name
        lines += ["", "## Explanations", "", f"![attributions]({plot})", ""]
        lines += [f"Method: {ex['method']}.", ""]
        lines += ["| class | dominant variable | dominant month |", "|---|---|---|"]
        lines += [
            f"| {name} | {var} | {ex['dominant_month_per_class'].get(name, '')} |"
            for name, var in ex["dominant_variable_per_class"].items()
        ]
    return lines


def publish_run_report(summary: dict, reports_dir: Path) -> None:
    """Write the report next to the stage reports and attach it, with the class-area and
    per-tile tables, to the Prefect flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    stages = read_stage_reports(reports_dir)
    markdown = run_report_markdown(summary) + operations_markdown(summary, stages, reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "run-report.md").write_text(markdown)
    name = summary["config"]
    create_markdown_artifact(markdown, key=f"run-report-{name}", description="pivotmap run report")
    areas = class_area_rows(Path(summary["map"]).parent / "class_areas.json")
    create_table_artifact(
        areas or [{"code": "", "name": "no class areas", "pixels": 0, "area_km2": 0.0}],
        key=f"class-areas-{name}",
        description=f"Class areas of the published map {summary['product_version']}",
    )
    create_table_artifact(
        tile_status_rows(stages),
        key=f"tile-status-{name}",
        description="Per tile and stage: written in this run, or skipped and why",
    )


# ---------------------------------------------------------------------------- operations
SKIP_REASON = "already done with the same inputs (cache key {key})"


def read_stage_reports(reports_dir: Path) -> dict[str, dict]:
    """The stage summaries (reports/<stage>.json) a run left, by stage."""
    import json

    out = {}
    for stage in ("ingest", "pivot", "train", "predict", "publish"):
        path = reports_dir / f"{stage}.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text())
    return out


def tile_status_rows(stages: dict[str, dict]) -> list[dict]:
    """One row per (stage, tile): 'written' in this run, or 'skipped' with the reason."""
    rows: list[dict] = []

    def add(stage: str, written: list, reused: list, key: str | None) -> None:
        for tile in written:
            rows.append({"stage": stage, "tile": tile, "status": "written", "reason": ""})
        reason = SKIP_REASON.format(key=key) if key else "already done"
        for tile in reused:
            rows.append({"stage": stage, "tile": tile, "status": "skipped", "reason": reason})

    for modality, m in stages.get("ingest", {}).get("modalities", {}).items():
        written = [t["tile"] for t in m.get("tiles_written", [])]
        add(f"ingest-{modality}", written, m.get("tiles_already_done", []), m.get("cache_key"))
    if pivot := stages.get("pivot"):
        written = [t["tile"] for t in pivot.get("tiles_written", [])]
        add("pivot", written, pivot.get("tiles_already_done", []), pivot.get("cube_version"))
    if predict := stages.get("predict"):
        written = [t["tile"] for t in predict.get("tiles", [])]
        add("predict", written, predict.get("tiles_already_done", []), predict.get("cache_key"))
    return rows or [{"stage": "", "tile": "", "status": "", "reason": "no tile processed"}]


def class_area_rows(path: Path) -> list[dict]:
    """Class areas of a published version (its class_areas.json), as table rows."""
    import json

    if not path.is_file():
        return []
    areas = json.loads(path.read_text())
    keys = ("code", "name", "pixels", "area_km2")
    return [{k: c[k] for k in keys} for c in areas["classes"]]


def operations_markdown(summary: dict, stages: dict[str, dict], reports_dir: Path) -> str:
    """Inputs, tiles written and skipped, quality gates (with their HTML) and product links."""
    ingest = stages.get("ingest", {})
    lines = ["", "## Inputs", ""]
    lines += [
        f"- {m}: collection `{v['collection']}`, {v['items_used']} items used of "
        f"{v['items_found']} found, {len(v['skipped_items'])} skipped, {v['dates']} dates"
        for m, v in ingest.get("modalities", {}).items()
    ]
    if "config_hash" in summary:
        lines.append(f"- period {summary['period']}; config hash `{summary['config_hash']}`")
    rows = tile_status_rows(stages)
    written = sum(r["status"] == "written" for r in rows)
    lines += ["", "## Tiles", "", f"{written} stage × tile written, "
              f"{sum(r['status'] == 'skipped' for r in rows)} skipped.", ""]  # fmt: skip
    lines += ["| stage | tile | status | reason |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['tile']} | {r['status']} | {r['reason']} |" for r in rows]
    lines += ["", "## Quality gates", ""]
    for stage in ("pivot", "publish"):
        quality = stages.get(stage, {}).get("quality")
        if quality:
            html = write_quality_html(reports_dir, quality)
            verdict = "passed" if quality["success"] else "FAILED"
            failed = [*quality["failed_critical"], *quality["failed_warning"]]
            lines.append(
                f"- `{quality['suite']}`: {verdict}, {quality['evaluated']} expectations"
                f"{'; ' + '; '.join(failed) if failed else ''} — [{html.name}]({html.as_uri()})"
            )
    lines += ["", "## Products", ""]
    for key in ("stac_catalog", "map", "quicklook"):
        if summary.get(key):
            lines.append(f"- {key}: [{summary[key]}]({_uri(summary[key])})")
    return "\n".join(lines) + "\n"


def write_quality_html(reports_dir: Path, quality: dict) -> Path:
    """reports/quality-<suite>.html: a Great Expectations result as a page people can open."""
    from pivotmap.tasks.quality import quality_html

    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / f"quality-{quality['suite'].replace('_', '-')}.html"
    path.write_text(quality_html(quality))
    return path


def stage_artifacts(stage: str, summary: dict, config_name: str, reports_dir: Path) -> None:
    """A stage's Prefect artifacts: its per-tile table and, with a quality gate, its HTML."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if stage == "train":
        create_markdown_artifact(
            train_markdown(summary), key=f"train-{config_name}", description="training result"
        )
    if summary.get("quality"):
        write_quality_html(reports_dir, summary["quality"])
    if stage in ("ingest", "pivot", "predict"):
        create_table_artifact(
            tile_status_rows({stage: summary}),
            key=f"{stage}-tiles-{config_name}",
            description=f"{stage}: tiles written in this run, or skipped and why",
        )


def train_markdown(summary: dict) -> str:
    """The trained model in a few lines: scores on held-out blocks, version, promotion."""
    lines = [
        f"# Model `{summary['model_name']}` v{summary['model_version']}",
        "",
        f"- overall accuracy {summary['overall_accuracy']:.3f}, macro-F1 "
        f"{summary['macro_f1']:.3f}, kappa {summary['kappa']:.3f} "
        f"({summary['n_test_pixels']} held-out pixels; {summary['split']})",
        f"- champion: {summary['promotion_reason']}",
        f"- MLflow run `{summary['run_id']}`, model URI `{summary['model_uri']}`",
        f"- cube version `{summary['cube_version']}`, device {summary['device']}",
    ]
    if summary.get("baseline"):
        b = summary["baseline"]
        lines.append(f"- random-forest baseline: OA {b['overall_accuracy']:.3f}, "
                     f"macro-F1 {b['macro_f1']:.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def kv(event: str, **fields) -> str:
    """A structured log line: `event key=value …` (values without spaces stay greppable)."""
    parts = [event] + [f"{k}={_kv_value(v)}" for k, v in fields.items()]
    return " ".join(parts)


def _kv_value(value) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def _uri(value: str) -> str:
    if "://" in value:
        return value
    return Path(value).resolve().as_uri()
