"""`pivotmap check` and the checks every stage command runs first (`tasks.checks`), plus the
model check (the registry lives in models/). No Prefect: checks answer in seconds."""

from __future__ import annotations

from pivotmap.config import RunConfig
from pivotmap.tasks.checks import (
    INPUT_CHECKS,
    Check,
    CheckFn,
    SkipCheck,
    checks_for,
    run_checks,
)


class ChecksFailed(RuntimeError):
    """One or more pre-flight checks failed; the message lists them."""


def check_model(config: RunConfig, out_dir: str | None) -> str:
    """`predict.model_uri` resolves on the tracking server of `mlflow.tracking_uri` (nothing is
    downloaded); without it, the run's own model is checked by `predict` only."""
    from pivotmap.models.registry import redacted, resolve_model_version, tracking_uri_for

    uri = config.predict.model_uri
    if not uri:
        raise SkipCheck("predict.model_uri not set: the run maps with its own trained model")
    tracking = tracking_uri_for(out_dir or ".", config.mlflow.tracking_uri)
    found = resolve_model_version(tracking_uri=tracking, model_uri=uri)
    return f"{uri} is {found['uri']} on {redacted(tracking)}"


def check_own_model(config: RunConfig, out_dir: str | None) -> str:
    """The model predict will use resolves: `predict.model_uri`, else the run's own
    `models:/<name>@<alias>` (registered by `train`)."""
    from pivotmap.models.inference import model_uri
    from pivotmap.models.registry import redacted, resolve_model_version, tracking_uri_for

    if out_dir is None:
        raise SkipCheck("no --out given: the run's model is not looked for")
    tracking = tracking_uri_for(out_dir, config.mlflow.tracking_uri)
    found = resolve_model_version(tracking_uri=tracking, model_uri=model_uri(config))
    return f"{model_uri(config)} is {found['uri']} on {redacted(tracking)}"


def all_checks(config: RunConfig, train: bool = True) -> dict[str, CheckFn]:
    """What a whole run needs (`pivotmap check`, `produce`): labels only when it trains, the
    model it maps with when that must exist already."""
    checks: dict[str, CheckFn] = dict(INPUT_CHECKS)
    trains = train and not config.predict.model_uri  # as `produce` decides
    if not trains:
        checks.pop("labels")
    checks["model"] = check_model if (config.predict.model_uri or trains) else check_own_model
    return checks


def check(
    config: RunConfig, out_dir: str | None = None, stage: str | None = None, train: bool = True
) -> list[Check]:
    """The checks of `stage` (ingest … publish), or of a whole run when None."""
    if stage is None:
        return run_checks(config, out_dir, all_checks(config, train))
    checks = checks_for(stage)
    if stage == "predict":
        checks["model"] = check_own_model
    return run_checks(config, out_dir, checks)


def require(checks: list[Check], what: str) -> None:
    """Raise ChecksFailed naming the failed checks and what to do about the first one."""
    failed = [c for c in checks if c.failed]
    if failed:
        names = ", ".join(c.name for c in failed)
        more = f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""
        raise ChecksFailed(f"{what}: check {names} failed: {failed[0].detail}{more}")


def checks_text(checks: list[Check], title: str) -> str:
    """The checks as a short table for people."""
    width = max((len(c.name) for c in checks), default=5)
    lines = [title]
    for c in checks:
        lines.append(f"  {c.status.upper():7} {c.name:{width}}  {c.detail}")
    passed = sum(c.status == "ok" for c in checks)
    failed = sum(c.failed for c in checks)
    skipped = len(checks) - passed - failed
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)
