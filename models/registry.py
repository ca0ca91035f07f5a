"""MLflow registry helpers: log a trained model, register it, move @champion only when it wins.

A model version holds the weights as safetensors plus `spec.json`, logged as an MLflow pyfunc
"model from code" (`models/mlflow_pyfunc.py`), so nothing is pickled and
`mlflow.pyfunc.load_model("models:/<name>@champion")` works for users. pivotmap itself reads
the weights directly (`load_champion`) and runs no code from the artifact.

Promotion rule: the candidate takes @champion only if its `macro_f1` is strictly higher than the
champion's, measured on the same held-out data (the `pivotmap.validation_key` tag).

MLflow is imported inside the functions: it costs seconds and the CLI must start fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # torch and mlflow cost seconds to import: only inside the functions
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from pivotmap.models.network import ModelSpec

log = logging.getLogger(__name__)

VALIDATION_KEY_TAG = "pivotmap.validation_key"
SCORE = "macro_f1"
CHAMPION = "champion"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")

# INFO chatter on every call (database creation, input-example validation).
_CHATTY_LOGGERS = ("mlflow.store.db.utils", "mlflow.pyfunc")


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model version and what happened to @champion."""

    name: str
    version: str
    run_id: str
    uri: str  # models:/<name>/<version>
    promoted: bool
    reason: str  # why the champion alias moved or did not
    champion_version: str  # version holding @champion after the call


@dataclass(frozen=True)
class ChampionInfo:
    """What promotion compares: the @champion's version, score and validation key."""

    version: str
    macro_f1: float | None
    validation_key: str | None


def tracking_uri_for(root: str, configured: str | None = None) -> str:
    """The tracking URI to use: the configured one, else a SQLite file under `root/mlflow` for a
    local run folder; a run folder on object storage needs a configured one (SQLite needs a
    local file)."""
    from pivotmap.tasks import storage

    if configured:
        return configured
    if storage.is_remote(str(root)):
        raise ValueError(
            f"`mlflow.tracking_uri` must be set for a run folder on object storage ({root}): "
            "point it at an MLflow server"
        )
    return f"sqlite:///{storage.local_path(storage.normalise(str(root))) / 'mlflow' / 'mlflow.db'}"


def log_and_register(
    *,
    tracking_uri: str,
    artifact_root: Path | str | None,
    experiment: str,
    model_name: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    params: dict,
    metrics: dict,
    validation_key: str,
    artifacts: dict[str, Path] | None = None,
    tags: dict | None = None,
    input_example: np.ndarray | None = None,
    model_files: dict[str, Path] | None = None,
) -> RegisteredModel:
    """Log a run with the model as a pyfunc, register a new version, and maybe promote it.

    Args:
        artifact_root: where a new experiment stores artifacts (a path or a URL such as
            s3://…); default for a SQLite tracking URI is `artifacts/` next to the database
            file, else the server's default.
        metrics: floats; nested dicts are flattened (`{"f1": {3: 0.8}}` -> `f1_3`). Must
            include `macro_f1`, the promotion score.
        validation_key: identifies the held-out data; scores are compared only on equal keys.
        artifacts: extra files (logged at the run root) or folders (logged under their key).
        model_files: files stored inside the model version beside its weights, by name (e.g. the
            text-alignment head); read back with `load_model_files`.
    """
    if not validation_key:
        raise ValueError("validation_key must name the held-out data the metrics come from")
    flat_metrics = _flatten_metrics(metrics)
    extra = _check_artifacts(artifacts or {})
    state = _checked_state_dict(model, spec)
    _quiet_loggers()
    import mlflow

    _ensure_sqlite_dir(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    root = artifact_root if artifact_root is not None else _default_artifact_root(tracking_uri)
    experiment_id = _experiment_id(client, experiment, root)
    run_tags = {**(tags or {}), VALIDATION_KEY_TAG: validation_key}
    with tempfile.TemporaryDirectory() as tmp, _using_tracking_uri(tracking_uri):
        files = _save_weights(state, spec, Path(tmp))
        files |= {
            name: str(_check_artifacts({name: p})[name]) for name, p in (model_files or {}).items()
        }
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=experiment_id, nested=nested) as run:
            mlflow.set_tags(run_tags)
            mlflow.log_params(_flatten_params(params))
            mlflow.log_metrics(flat_metrics)  # before log_model, so the LoggedModel gets them too
            _log_extra_artifacts(extra)
            info = _log_pyfunc(files, spec, input_example)
        version_tags = {VALIDATION_KEY_TAG: validation_key}
        version_tags |= {f"metric.{k}": f"{v:.6g}" for k, v in flat_metrics.items()}
        version = _register(info.model_uri, model_name, version_tags)
    promoted, reason, champion = _update_champion(
        client, model_name, version, flat_metrics[SCORE], validation_key
    )
    log.info("registered %s v%s (run %s): %s", model_name, version, run.info.run_id, reason)
    return RegisteredModel(
        name=model_name,
        version=version,
        run_id=run.info.run_id,
        uri=f"models:/{model_name}/{version}",
        promoted=promoted,
        reason=reason,
        champion_version=champion,
    )


def load_champion(
    *, tracking_uri: str, model_name: str, alias: str = CHAMPION, device: str = "cpu"
) -> tuple[torch.nn.Module, ModelSpec, dict]:
    """The network behind `models:/<model_name>@<alias>`, in eval mode on `device`.

    Reads spec.json and the safetensors weights only: no pickle, no code from the artifact.

    Returns:
        (model, spec, {"name", "version", "run_id", "uri"} of the resolved version).

    Raises:
        LookupError: no such registered model or alias in the registry at `tracking_uri`.
    """
    _quiet_loggers()
    import mlflow
    from safetensors.torch import load_file

    from pivotmap.models.network import ModelSpec, build_model

    _require_sqlite_db(tracking_uri, model_name, alias)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = _version_by_alias(client, tracking_uri, model_name, alias)
    uri = f"models:/{model_name}/{mv.version}"
    # The version's own artifact URI: MLflow 3.17 resolves a models:/ URI against the global
    # registry URI, whatever registry_uri download_artifacts is given.
    source = client.get_model_version_download_uri(model_name, mv.version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        weights, spec_path = _artifact_paths(local, uri)
        spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
        state = load_file(weights, device="cpu")
    net = build_model(spec)
    net.load_state_dict(state)
    net = net.to(device).eval()
    info = {"name": model_name, "version": str(mv.version), "run_id": mv.run_id, "uri": uri}
    return net, spec, info


def load_model_files(
    *, tracking_uri: str, model_name: str, version: str, names: tuple[str, ...]
) -> dict[str, bytes]:
    """The bytes of files stored with a model version (`model_files` of `log_and_register`);
    a name the version does not hold is absent from the result."""
    _quiet_loggers()
    import mlflow
    import yaml

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(model_name, version).rstrip("/")
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri
        )
        flavor = yaml.safe_load(Path(mlmodel).read_text(encoding="utf-8"))["flavors"]
        named = flavor.get("python_function", {}).get("artifacts", {})
        for name in names:
            if name not in named:
                continue
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{named[name]['path']}", dst_path=tmp,
                tracking_uri=tracking_uri,
            )  # fmt: skip
            out[name] = Path(local).read_bytes()
    return out


def promotion_decision(
    candidate_version: str, candidate_f1: float, validation_key: str, champion: ChampionInfo | None
) -> tuple[bool, str]:
    """Whether the candidate takes @champion, and why (pure: no MLflow)."""
    cand = f"candidate v{candidate_version} {SCORE} {candidate_f1:.4f}"
    if champion is None:
        return True, f"no champion yet; {cand} on validation key {validation_key!r} promoted"
    champ = f"champion v{champion.version}"
    if champion.validation_key != validation_key:
        return False, (
            f"{champ} validated on a different key ({champion.validation_key!r}, candidate "
            f"{validation_key!r}); scores not comparable; kept v{champion.version}"
        )
    if champion.macro_f1 is None:
        return False, f"{champ} has no {SCORE} to compare with; kept v{champion.version}"
    scores = f"{champ} {SCORE} {champion.macro_f1:.4f} on validation key {validation_key!r}"
    if candidate_f1 > champion.macro_f1:
        return True, f"{cand} > {scores}; promoted"
    return False, f"{cand} ≤ {scores}; kept v{champion.version}"


# --- inputs -------------------------------------------------------------------------------


def _flatten_metrics(metrics: Mapping) -> dict[str, float]:
    """Floats by name; one level of nesting becomes `<outer>_<inner>` (per-class F1)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in items:
            name = str(key) if sub is None else f"{key}_{sub}"
            try:
                flat[name] = float(v)
            except (TypeError, ValueError) as err:
                raise ValueError(f"metric {name!r} is not a number: {v!r}") from err
    if SCORE not in flat or not math.isfinite(flat[SCORE]):
        raise ValueError(f"metrics must include a finite {SCORE!r} (the promotion score)")
    return flat


def _flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= _flatten_params(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def _check_artifacts(artifacts: Mapping[str, Path]) -> dict[str, Path]:
    checked = {name: Path(path) for name, path in artifacts.items()}
    for name, path in checked.items():
        if not path.exists():
            raise FileNotFoundError(f"artifact {name!r}: {path} does not exist")
    return checked


def _checked_state_dict(model: torch.nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """CPU copy of the weights, checked to load into `build_model(spec)`."""
    from pivotmap.models.network import build_model

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    build_model(spec).load_state_dict(state)  # a mismatch fails here, not at prediction time
    return state


# --- MLflow plumbing ------------------------------------------------------------------------


def _quiet_loggers() -> None:
    """Quiet MLflow's INFO chatter unless MLFLOW_LOGGING_LEVEL is set (telemetry and progress
    bars are off through `pivotmap.runtime.OFFLINE_DEFAULTS`)."""
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model) at `tracking_uri`, then restore.

    MLflow mirrors its global URIs into these environment variables, so restoring them after
    clearing the globals restores what the caller had.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        # None resets MLflow's globals (what the code does; the annotations only say str)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def _ensure_sqlite_dir(tracking_uri: str) -> None:
    if (db := _sqlite_path(tracking_uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


def _default_artifact_root(tracking_uri: str) -> Path | None:
    db = _sqlite_path(tracking_uri)
    return None if db is None else db.resolve().parent / "artifacts"


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path | str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it or choose another name"
            )
        return found.experiment_id
    location: str | None = None
    if artifact_root is not None:
        is_url = isinstance(artifact_root, str) and "://" in artifact_root
        location = str(artifact_root) if is_url else Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _save_weights(state: dict, spec: ModelSpec, folder: Path) -> dict[str, str]:
    from safetensors.torch import save_file

    weights, spec_path = folder / WEIGHTS_FILE, folder / SPEC_FILE
    save_file(state, str(weights), metadata={"format": "pt"})
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    return {"weights": str(weights), "spec": str(spec_path)}


def _log_pyfunc(files: dict[str, str], spec: ModelSpec, input_example: np.ndarray | None):
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, len(spec.channels)))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )
    # An example lets MLflow check, at logging time, that the logged model loads and predicts.
    if input_example is None:
        input_example = np.zeros((1, spec.n_steps, len(spec.channels)), dtype=np.float32)
    input_example = np.asarray(input_example, dtype=np.float32)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),  # models from code: nothing is cloudpickled
        artifacts=files,
        signature=signature,
        input_example=input_example,
        model_config={"device": "cpu"},  # load_model(..., model_config={"device": "cuda"})
        pip_requirements=_pip_requirements(),  # explicit: inference would load the model again
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("pivotmap", "torch", "safetensors", "numpy"):
        try:
            reqs.append(f"{package}=={version(package).split('+', 1)[0]}")
        except PackageNotFoundError:
            reqs.append(package)
    return reqs


def _log_extra_artifacts(extra: Mapping[str, Path]) -> None:
    import mlflow

    for name, path in extra.items():
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=name)
        else:
            mlflow.log_artifact(str(path))


def _register(model_uri: str, model_name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version; MLflow's stderr chatter goes to our debug log."""
    import mlflow

    chatter = io.StringIO()
    try:
        with contextlib.redirect_stderr(chatter):
            mv = mlflow.register_model(model_uri, model_name, tags=tags)
    finally:
        for line in chatter.getvalue().splitlines():
            log.debug("mlflow: %s", line)
    return str(mv.version)


def _update_champion(
    client: MlflowClient, model_name: str, version: str, macro_f1: float, validation_key: str
) -> tuple[bool, str, str]:
    champion = _current_champion(client, model_name)
    promoted, reason = promotion_decision(version, macro_f1, validation_key, champion)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        return promoted, reason, version
    assert champion is not None  # promotion_decision promotes when there is no champion
    return promoted, reason, champion.version


def _current_champion(client: MlflowClient, model_name: str) -> ChampionInfo | None:
    """@champion's score and validation key, from its run (version tags as fallback)."""
    from mlflow.exceptions import MlflowException

    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    if version is None:
        return None
    mv = client.get_model_version(model_name, version)
    metrics, tags = {}, dict(mv.tags)
    if mv.run_id:
        with contextlib.suppress(MlflowException):  # run deleted: the version tags remain
            run = client.get_run(mv.run_id)
            metrics, tags = run.data.metrics, {**tags, **run.data.tags}
    score = metrics.get(SCORE, tags.get(f"metric.{SCORE}"))
    return ChampionInfo(
        version=str(version),
        macro_f1=None if score is None else float(score),
        validation_key=tags.get(VALIDATION_KEY_TAG),
    )


def _version_by_alias(client: MlflowClient, tracking_uri: str, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    where = f"in the MLflow registry at {_redacted(tracking_uri)}"
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LookupError(
            f"no registered model {model_name!r} (alias @{alias}) {where}; "
            "run `pivotmap train` first"
        ) from None
    version = registered.aliases.get(alias)
    if version is None:
        raise LookupError(
            f"registered model {model_name!r} has no alias @{alias} {where}; "
            "run `pivotmap train` first (it registers a version and sets @champion)"
        )
    return client.get_model_version(model_name, version)


def _require_sqlite_db(tracking_uri: str, model_name: str, alias: str) -> None:
    """Loading must not create an empty database as a side effect."""
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise LookupError(
            f"no MLflow database at {db}, so no model {model_name!r} with alias @{alias} "
            f"(tracking URI {tracking_uri}); run `pivotmap train` first"
        )


def _artifact_paths(local: Path, uri: str) -> tuple[Path, Path]:
    """The weights and spec files of a downloaded pivotmap model, read from its MLmodel."""
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    named = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    try:
        return local / named["weights"]["path"], local / named["spec"]["path"]
    except (KeyError, TypeError):
        raise ValueError(f"{uri} is not a pivotmap model (no weights/spec artifacts)") from None


def _redacted(uri: str) -> str:
    """The URI without a password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
