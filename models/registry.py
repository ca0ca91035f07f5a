"""MLflow registry helpers: log a trained model, register it, move @champion only when it wins.

A model version holds the weights as safetensors plus `spec.json`, and the same network as a
`torch.export` program, logged as an MLflow pyfunc "model from code" (`models/mlflow_pyfunc.py`,
with `models/pivot_series.py` as its code path): nothing is pickled, and
`mlflow.pyfunc.load_model("models:/<name>@champion")` runs for users without pivotmap, from the
raw daily series of the pivot cube. pivotmap itself reads the weights directly (`load_champion`)
and runs no code from the artifact. What MLflow stores with the model names no local path of
the producer: local paths in params become their last name, and the MLmodel is cleaned.

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
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pivotmap.models.cube_settings import as_tags as cube_tags

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
NETWORK_FILE = "network.pt2"  # the torch.export program the pyfunc runs
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
PREPROCESSING_CODE = Path(__file__).with_name("pivot_series.py")  # imports nothing of pivotmap
# What the logged model installs: index packages only, pinned as pivotmap runs them.
MODEL_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas")

# What `predict.model_uri` accepts (MLflow's registry URIs, by alias or version number).
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[^/@\s]+)|/(?P<version>[0-9]+))$")

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
    input_example: np.ndarray | Mapping[str, np.ndarray] | None = None,
    model_files: dict[str, Path] | None = None,
    cube_settings: Mapping[str, str] | None = None,
    run_name: str | None = None,
    started_at: float | None = None,
) -> RegisteredModel:
    """Log a run with the model as a pyfunc, register a new version, and maybe promote it.

    Args:
        artifact_root: where a new experiment stores artifacts (a path or a URL such as
            s3://…); default for a SQLite tracking URI is `artifacts/` next to the database
            file, else the server's default.
        metrics: floats; nested dicts are flattened (`{"f1": {3: 0.8}}` -> `f1_3`). Must
            include `macro_f1`, the promotion score.
        validation_key: identifies the held-out data; scores are compared only on equal keys.
        params: logged as the run's parameters; a local path (e.g. `cube_url`) is logged as its
            last name only: published metadata names no folder of the producer.
        artifacts: extra files (logged at the run root) or folders (logged under their key).
        input_example: kept for older callers and ignored unless a dict in the pyfunc's input
            form (`models/mlflow_pyfunc.py`); by default an example is built from `spec`.
        model_files: files stored inside the model version beside its weights, by name (e.g. the
            text-alignment head); read back with `load_model_files`.
        cube_settings: the settings of the cube the model learnt from (`models/cube_settings`),
            kept as `pivotmap.cube.*` tags of the run and the version: predict refuses a cube
            built otherwise.
        run_name: the run's name in the MLflow UI (default: MLflow's random one).
        started_at: when the training began (epoch seconds): the run's start time, so its
            duration is the training's, not the logging's.
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
    settings = cube_tags(cube_settings or {})
    run_tags = {**_flatten_params(tags or {}), **settings, VALIDATION_KEY_TAG: validation_key}
    run_tags.setdefault("mlflow.source.name", _script_name())
    with tempfile.TemporaryDirectory() as tmp, _using_tracking_uri(tracking_uri):
        files = _save_weights(state, spec, Path(tmp))
        files |= {
            name: str(_check_artifacts({name: p})[name]) for name, p in (model_files or {}).items()
        }
        nested = mlflow.active_run() is not None
        run_id = None
        if started_at is not None and not nested:
            run_id = client.create_run(
                experiment_id, start_time=int(started_at * 1000), run_name=run_name
            ).info.run_id
        with mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=None if run_id else run_name,
            nested=nested,
        ) as run:
            mlflow.set_tags(run_tags)
            mlflow.log_params(_flatten_params(params))
            mlflow.log_metrics(flat_metrics)  # before log_model, so the LoggedModel gets them too
            _log_extra_artifacts(extra)
            info = _log_pyfunc(files, spec, input_example)
            _clean_mlmodel(info.model_id, Path(tmp))
        version_tags = {VALIDATION_KEY_TAG: validation_key, **settings}
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

    Returns:
        (model, spec, {"name", "version", "run_id", "uri"} of the resolved version).

    Raises:
        LookupError: no such registered model or alias in the registry at `tracking_uri`.
    """
    found = load_model(
        tracking_uri=tracking_uri, model_uri=f"models:/{model_name}@{alias}", device=device
    )
    return found.model, found.spec, found.info


@dataclass(frozen=True)
class LoadedModel:
    """A registered version's network, its spec, its reference and its version tags."""

    model: torch.nn.Module
    spec: ModelSpec
    info: dict[str, str]  # name, version, run_id, uri (models:/<name>/<version>)
    tags: dict[str, str]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    match = MODEL_URI.match(uri.strip())
    if match is None:
        raise ValueError(
            f"model URI {uri!r} is not models:/<name>@<alias> or models:/<name>/<version> "
            "(e.g. models:/pivotmap-demo@champion, models:/pivotmap-demo/3)"
        )
    return match["name"], match["alias"], match["version"]


def load_model(*, tracking_uri: str, model_uri: str, device: str = "cpu") -> LoadedModel:
    """The network of a registered version (`models:/<name>@<alias>` or `…/<version>`) on the
    MLflow registry at `tracking_uri`, in eval mode on `device`.

    Reads spec.json and the safetensors weights only: no pickle, no code from the artifact.

    Raises:
        LookupError: the URI does not resolve there (its message names both URIs and what to do).
    """
    _quiet_loggers()
    import mlflow
    from safetensors.torch import load_file

    from pivotmap.models.network import ModelSpec, build_model

    name, alias, version = parse_model_uri(model_uri)
    _require_sqlite_db(tracking_uri, model_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = _resolve_version(client, tracking_uri, model_uri, name, alias, version)
    uri = f"models:/{name}/{mv.version}"
    # The version's own artifact URI: MLflow 3.17 resolves a models:/ URI against the global
    # registry URI, whatever registry_uri download_artifacts is given.
    source = client.get_model_version_download_uri(name, mv.version)
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
    info = {"name": name, "version": str(mv.version), "run_id": mv.run_id or "", "uri": uri}
    return LoadedModel(model=net, spec=spec, info=info, tags=dict(mv.tags or {}))


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
    """Strings by dotted name, local paths reduced to their last name (`_public_value`)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= _flatten_params(value, f"{name}.")
        else:
            flat[name] = _public_value(str(value))
    return flat


def _script_name() -> str:
    """The running program's name for MLflow's `mlflow.source.name` tag (MLflow records its
    path, a folder of the producer)."""
    return PurePosixPath(sys.argv[0].replace("\\", "/")).name or "python"


def _public_value(value: str) -> str:
    """A local path (`/…`, `~/…`, `file:…`, `C:\\…`) as its last name; anything else unchanged.

    MLflow shows params and tags to whoever reads the registry, and the producer's folders mean
    nothing there (and disclose its layout); URLs such as s3://… stay as they are."""
    text = value.strip()
    if not re.match(r"^(/|~|file:|[A-Za-z]:[\\/])", text) or "\n" in text:
        return value
    name = PurePosixPath(text.replace("\\", "/").rstrip("/")).name
    return name or value


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
        if EXPERIMENT_KIND[0] not in found.tags:  # experiments made before the kind was set
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location: str | None = None
    if artifact_root is not None:
        is_url = isinstance(artifact_root, str) and "://" in artifact_root
        location = str(artifact_root) if is_url else Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _save_weights(state: dict, spec: ModelSpec, folder: Path) -> dict[str, str]:
    """The weights and spec pivotmap reads, and the exported network the pyfunc runs."""
    from safetensors.torch import save_file

    weights, spec_path = folder / WEIGHTS_FILE, folder / SPEC_FILE
    save_file(state, str(weights), metadata={"format": "pt"})
    spec_path.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    network = _export_network(state, spec, folder / NETWORK_FILE)
    return {"weights": str(weights), "spec": str(spec_path), "network": str(network)}


def _export_network(state: dict, spec: ModelSpec, path: Path) -> Path:
    """The eval-mode network as a `torch.export` program, any number of pixels [N, T, C].

    An exported graph freezes the architecture with the model (later pivotmap code cannot
    break a registered version) and needs no pivotmap code to run; it computes what the
    eager network computes, bit for bit on CPU."""
    import torch

    from pivotmap.models.network import build_model, exportable

    net = build_model(spec)
    net.load_state_dict(state)
    example = torch.zeros(2, spec.n_steps, len(spec.channels))
    pixels = torch.export.Dim("pixels", min=1)
    voting = exportable(net.eval())  # an ensemble's program: (mean probabilities, agreement)
    program = torch.export.export(voting, (example,), dynamic_shapes=({0: pixels},))
    program._example_inputs = None  # else torch.export.save pickles them into the archive
    torch.export.save(program, str(path))
    return path


def _log_pyfunc(files: dict[str, str], spec: ModelSpec, input_example: object):
    import mlflow

    if not isinstance(input_example, Mapping):  # a network-input array from older callers
        input_example = _input_example(spec)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),  # models from code: nothing is cloudpickled
        code_paths=[str(PREPROCESSING_CODE)],
        artifacts=files,
        signature=_signature(spec),
        # An example lets MLflow check, at logging time, that the logged model loads and predicts.
        input_example=dict(input_example),
        model_config={"device": "cpu"},  # load_model(..., model_config={"device": "cuda"})
        pip_requirements=_pip_requirements(),  # explicit: inference would load the model again
        tags={"mlflow.source.name": _script_name()},
    )


def pyfunc_inputs(spec: ModelSpec) -> tuple[str, ...]:
    """The pyfunc's input names: `time`, then the pivot variables the network reads."""
    return ("time", *spec.s2_channels, *spec.s1_channels)


def _signature(spec: ModelSpec):
    """Exact shapes: MLflow refuses a daily axis of another length before the model runs."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    days = spec.n_steps * spec.step_days
    f32 = np.dtype(np.float32)
    inputs = [TensorSpec(np.dtype("datetime64[ns]"), (days,), "time")]
    inputs += [TensorSpec(f32, (-1, days), name) for name in pyfunc_inputs(spec)[1:]]
    outputs = [ColSpec("integer", "class"), ColSpec("integer", "confidence")]
    outputs += [ColSpec("float", f"p_{code}") for code in spec.classes]
    params = ParamSchema([ParamSpec("calendar_shift_days", "integer", 0)])
    return ModelSignature(
        inputs=Schema(inputs),  # type: ignore[arg-type]
        outputs=Schema(outputs),  # type: ignore[arg-type]
        params=params,
    )


def _input_example(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Two pixels a year from 2024-01-01: one at the training means, observed daily, one empty."""
    import numpy as np

    days = spec.n_steps * spec.step_days
    start = np.datetime64("2024-01-01", "ns")
    example: dict[str, np.ndarray] = {"time": start + np.arange(days) * np.timedelta64(1, "D")}
    for name in pyfunc_inputs(spec)[1:]:
        typical = 0.0 if name.startswith("age_") else spec.norm_mean.get(name, 0.0)
        values = np.full((2, days), np.nan, dtype=np.float32)
        values[0] = typical
        example[name] = values
    return example


def _pip_requirements() -> list[str]:
    """The model's requirements, pinned to what runs here; never pivotmap."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in MODEL_REQUIREMENTS:
        try:
            reqs.append(f"{package}=={version(package).split('+', 1)[0]}")
        except PackageNotFoundError:
            reqs.append(package)
    return reqs


def _clean_mlmodel(model_id: str, folder: Path) -> None:
    """Rewrite the logged MLmodel without the producer's local paths (`public_mlmodel`)."""
    import mlflow
    import yaml

    source = mlflow.get_logged_model(model_id).artifact_location.rstrip("/")
    (folder / "mlmodel").mkdir()
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{source}/MLmodel", dst_path=str(folder / "mlmodel")
    )
    raw = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
    Path(local).write_text(yaml.safe_dump(public_mlmodel(raw), sort_keys=False), encoding="utf-8")
    mlflow.MlflowClient().log_model_artifact(model_id, local)


def public_mlmodel(raw: dict) -> dict:
    """The MLmodel without local paths: the artifacts' source files (`uri`), the code file's
    folder and the artifact location are producer-side facts that loading never reads."""
    out = dict(raw)
    out["artifact_path"] = "model"  # MLflow 3 writes the artifact location (file:///…) here
    pyfunc = dict(out.get("flavors", {}).get("python_function", {}))
    if "model_code_path" in pyfunc:  # loading joins its name to the model folder
        pyfunc["model_code_path"] = PurePosixPath(str(pyfunc["model_code_path"])).name
    pyfunc["artifacts"] = {
        name: {k: v for k, v in entry.items() if k != "uri"}
        for name, entry in (pyfunc.get("artifacts") or {}).items()
    }
    out["flavors"] = {**out.get("flavors", {}), "python_function": pyfunc}
    return out


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


def _resolve_version(
    client: MlflowClient,
    tracking_uri: str,
    model_uri: str,
    name: str,
    alias: str | None,
    version: str | None,
):
    """The model version `model_uri` names, or a LookupError saying why it does not resolve."""
    from mlflow.exceptions import MlflowException

    def missing(why: str) -> LookupError:
        return LookupError(
            f"{model_uri} does not resolve in the MLflow registry at {_redacted(tracking_uri)}: "
            f"{why}; {NOT_FOUND_HINT}"
        )

    try:
        registered = client.get_registered_model(name)
        if version is None:
            version = registered.aliases.get(alias)
            if version is None:
                known = ", ".join(f"@{a}" for a in sorted(registered.aliases)) or "none"
                raise missing(f"registered model {name!r} has no alias @{alias} (aliases: {known})")
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        what = f"version {version}" if version else f"registered model {name!r}"
        raise missing(f"no {what}") from None


NOT_FOUND_HINT = (
    "run `pivotmap train` first (it registers a version and sets @champion), or set "
    "`predict.model_uri` to a registered model and `mlflow.tracking_uri` to the tracking server "
    "it was registered on"
)


def _require_sqlite_db(tracking_uri: str, model_uri: str) -> None:
    """Loading must not create an empty database as a side effect."""
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise LookupError(
            f"{model_uri} does not resolve: no MLflow database at {db} (tracking URI "
            f"{tracking_uri}); {NOT_FOUND_HINT}"
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
    """The URI without its user and password, for messages and logs."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def redacted(uri: str) -> str:
    """`uri` as messages may show it: no user or password."""
    return _redacted(uri)


# --- resolving and promoting by hand (`pivotmap check`, `pivotmap promote`) -----------------


def resolve_model_version(*, tracking_uri: str, model_uri: str) -> dict[str, str]:
    """The version `model_uri` names on the registry at `tracking_uri`, without downloading
    it: {"name", "version", "run_id", "uri"}; a LookupError says why it does not resolve."""
    _quiet_loggers()
    import mlflow

    name, alias, version = parse_model_uri(model_uri)
    _require_sqlite_db(tracking_uri, model_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = _resolve_version(client, tracking_uri, model_uri, name, alias, version)
    return {"name": name, "version": str(mv.version), "run_id": mv.run_id or "",
            "uri": f"models:/{name}/{mv.version}"}  # fmt: skip


def promote(*, tracking_uri: str, model_name: str, version: str) -> dict[str, str | None]:
    """Move @champion to `version` by hand (it must be registered), whatever its score:
    {"model", "previous", "champion", "uri"}; previous is None when there was no champion."""
    _quiet_loggers()
    import mlflow

    uri = f"models:/{model_name}/{version}"
    found = resolve_model_version(tracking_uri=tracking_uri, model_uri=uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    previous = client.get_registered_model(model_name).aliases.get(CHAMPION)
    client.set_registered_model_alias(model_name, CHAMPION, found["version"])
    log.info("promoted %s v%s to @%s by hand (was v%s)", model_name, version, CHAMPION, previous)
    return {"model": model_name, "previous": None if previous is None else str(previous),
            "champion": found["version"], "uri": uri}  # fmt: skip
