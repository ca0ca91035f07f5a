"""Concept maps of the configured prompts and explanations of the class map, as Prefect flows
(issue 9); the work is `models.concept.concept_maps` and `models.explain.explain`."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pivotmap.config import RunConfig
from pivotmap.models.concept import concept_maps
from pivotmap.models.explain import explain
from pivotmap.results import ConceptResult, ExplainResult
from pivotmap.tasks.workspace import Workspace


@flow(name="concept-maps")
def concept_maps_flow(config: RunConfig, out_dir: str) -> ConceptResult:
    """Concept maps of `concept.prompts`, one COG per tile and prompt, for publishing."""
    result = concept_maps(Workspace.open(config, out_dir))
    create_markdown_artifact(
        concept_markdown(result), key=f"concept-{config.name}", description="concept maps"
    )
    return result


@flow(name="explain")
def explain_flow(config: RunConfig, out_dir: str) -> ExplainResult:
    """Explanation layers per tile, the per-class plot and the saliency of chosen pixels."""
    result = explain(Workspace.open(config, out_dir))
    create_table_artifact(
        explain_rows(result),
        key=f"explain-{config.name}",
        description=f"dominant variable and month per class ({result.method})",
    )
    return result


def concept_markdown(result: ConceptResult) -> str:
    """What the concept stage made, or why it made nothing."""
    if result.skipped or result.model is None:
        return f"No concept maps: {result.skipped}"
    prompts = ", ".join(f"'{p}'" for p in result.prompts)
    model = f"{result.model.name} v{result.model.version}"
    text = f"Concept maps of {prompts} over {len(result.layers)} tiles, model {model}."
    for prompt, warning in result.warnings.items():
        text += f"\n\n**Not meaningful: '{prompt}'.** {warning}"
    return text


def explain_rows(result: ExplainResult) -> list[dict]:
    """One row per class: the variable and the month that mattered most."""
    return [
        {"class": name, "variable": variable, "month": result.dominant_month_per_class[name]}
        for name, variable in result.dominant_variable_per_class.items()
    ]
