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
    return "\n".join(lines) + "\n"


def publish_run_report(summary: dict, reports_dir: Path) -> None:
    """Write the report next to the stage reports and attach it to the Prefect flow run."""
    from prefect.artifacts import create_markdown_artifact

    markdown = run_report_markdown(summary)
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "run-report.md").write_text(markdown)
    create_markdown_artifact(
        markdown, key=f"run-report-{summary['config']}", description="pivotmap run report"
    )
