"""The train stage: labels and pivot cube → a fused S1/S2 classifier, measured and registered.

Steps (each one a Prefect task when `flows/train.py` runs them; training uses CUDA with bf16
autocast where the stage runs on a GPU, elsewhere the CPU):

1. split the labels in spatial blocks; read the labelled pixels and a sample of unlabelled ones
   (never from held-out blocks) — `models/datamodule.py`;
2. optionally pretrain the encoders by masked reconstruction on the unlabelled pixels;
3. train the classifier (from the pretrained encoders when there are some); with
   `train.ensemble_members` N > 1, steps 2 and 3 run N times with seeds seed … seed+N-1, each
   member is scored on its own, and the ensemble (mean probabilities) is registered;
4. the baseline: trees on calendar-free (or date-indexed) features of the same pixels and
   split (`train.baseline_features`, `train.baseline_model`);
5. optionally distil a smaller student, and align the encoder with class descriptions (text);
6. log everything to MLflow, register the model (and the student) and move @champion only when
   the candidate wins on the same held-out data.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pivotmap import __version__
from pivotmap.models.datamodule import (
    TrainingData,
    TrainingDataError,
    augmentation,
    prepare_data,
    read_tables,
    samples_of,
    stratified_sample,
)
from pivotmap.models.evaluation import code_version, confusion_png, headline, metrics
from pivotmap.models.network import count_parameters, ensemble_of, flops_per_pixel
from pivotmap.models.training import (
    FitResult,
    cpu_threads,
    fastest_threads,
    pick_device,
    predict_vote,
)
from pivotmap.results import PivotResult, SampleResult, TrainResult
from pivotmap.runtime import run_logger
from pivotmap.tasks.nomenclature import load_nomenclature

if TYPE_CHECKING:
    from pivotmap.config import RunConfig, TrainConfig
    from pivotmap.models.network import ModelSpec
    from pivotmap.models.registry import RegisteredModel
    from pivotmap.tasks.nomenclature import Nomenclature
    from pivotmap.tasks.workspace import Workspace

Step = Callable[[Callable], Callable]  # wraps a step function (e.g. as a Prefect task)


def _as_is(fn: Callable) -> Callable:
    return fn


# ---------------------------------------------------------------------------- the steps
def load_training_data(config: RunConfig, samples: list[SampleResult]) -> TrainingData:
    """The training tables (this run's and `train.include`'s) as network inputs."""
    return prepare_data(config, read_tables(samples))


def samples_tables(ws: Workspace) -> list[str]:
    return [s.table for s in samples_of(ws)]


def pretrain_encoder(data: TrainingData, tc: TrainConfig, device: str) -> dict:
    """Masked-reconstruction pretraining on the unlabelled pixels: encoder weights and losses."""
    from pivotmap.models.pretrain import pretrain

    state, losses = pretrain(
        data.x_unlabelled,
        data.spec,
        epochs=tc.pretrain_epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        device=device,
    )
    return {"state": state, "losses": losses, "pixels": len(data.x_unlabelled)}


def train_classifier(
    data: TrainingData, tc: TrainConfig, device: str, init_state: dict | None = None
) -> FitResult:
    """Supervised training on the training pixels (from pretrained encoders if given)."""
    from pivotmap.models.training import fit

    idx = data.train_idx
    return fit(
        data.x.subset(idx),
        data.y[idx],
        data.spec,
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        device=device,
        init_state=init_state,
        init_lr_scale=tc.pretrain_lr_scale,
        augment=augmentation(tc, data.spec),
    )


def member_config(tc: TrainConfig, member: int) -> TrainConfig:
    """The training settings of an ensemble's member `member` (0 = the run's own seed)."""
    return tc if member == 0 else tc.model_copy(update={"seed": tc.seed + member})


def train_members(
    data: TrainingData, tc: TrainConfig, device: str, step: Step = _as_is
) -> tuple[list[FitResult], dict | None]:
    """The classifier trained `train.ensemble_members` times, member i as one network of seed
    `seed + i` trains (its own pretraining first, when on); the fits and the first member's
    pretraining. Members sharing one pretraining differ too little: on the transfer benchmark
    their ensemble was no better than its average member and its seed spread stayed."""
    fits, first = [], None
    for i in range(tc.ensemble_members):
        member = member_config(tc, i)
        pretrained = step(pretrain_encoder)(data, member, device) if tc.pretrain_epochs else None
        init = pretrained["state"] if pretrained else None
        fits.append(step(train_classifier)(data, member, device, init))
        first = pretrained if i == 0 else first
    return fits, first


def random_forest_baseline(data: TrainingData, tc: TrainConfig) -> dict:
    """The baseline (`train.baseline_model` on `train.baseline_features`), same pixels and
    split; its scores."""
    started = time.monotonic()
    features = baseline_features(data, tc)
    model = fit_baseline(features[data.train_idx], data.codes[data.train_idx], tc)
    predicted = model.predict(features[data.is_test])
    scores = metrics(data.codes[data.is_test], predicted, data.spec.classes)
    return {
        **scores,
        "model": baseline_name(tc),
        "features": int(features.shape[1]),
        "duration_s": round(time.monotonic() - started, 2),
    }


def baseline_name(tc: TrainConfig) -> str:
    """What the run summary calls the configured baseline."""
    if tc.baseline_model == "gradient_boosting":
        trees = f"HistGradientBoostingClassifier({tc.baseline_trees} rounds, class-balanced)"
    else:
        trees = f"RandomForestClassifier({tc.baseline_trees} trees, class-balanced)"
    return f"{trees} on {tc.baseline_features} features"


def fit_baseline(features: np.ndarray, codes: np.ndarray, tc: TrainConfig):
    """The configured baseline's trees, fitted (a scikit-learn classifier)."""
    from pivotmap.models.baseline import fit_gradient_boosting, fit_random_forest

    fit = fit_gradient_boosting if tc.baseline_model == "gradient_boosting" else fit_random_forest
    return fit(features, codes, trees=tc.baseline_trees, seed=tc.seed)


def baseline_features(data: TrainingData, tc: TrainConfig, chunk: int = 20_000) -> np.ndarray:
    """The baseline's features (`train.baseline_features`) of every labelled pixel, decoded
    `chunk` pixels at a time (memory bounded by the chunk, not the table)."""
    from pivotmap.models.baseline import percentile_features, temporal_features

    names = data.spec.channels[:-2]

    def features(series: np.ndarray) -> np.ndarray:
        if tc.baseline_features == "temporal":
            return temporal_features(series, names, tc.baseline_every)
        return percentile_features(series, names)

    parts = [
        features(data.series(np.arange(start, min(start + chunk, len(data.x)))))
        for start in range(0, max(len(data.x), 1), chunk)
    ]
    return np.concatenate(parts)


def distil_student(data: TrainingData, teacher, tc: TrainConfig, device: str) -> FitResult:
    """A smaller student trained on the teacher's soft predictions (all non-test pixels)."""
    from pivotmap.models.distill import distill, student_spec

    y_pool = np.full(len(data.x_unlabelled), -1)
    x = data.x.subset(data.train_idx).join(data.x_unlabelled)
    y = np.concatenate([data.y[data.train_idx], y_pool])
    return distill(
        teacher,
        x,
        y,
        student_spec(data.spec, tc.distill_hidden),
        epochs=tc.distill_epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        device=device,
    )


def start_text_embedding(nomenclature: Nomenclature, config: RunConfig, data: TrainingData):
    """Embed every class phrasing, configured prompt and the descriptor sentences of the
    alignment's training pixels in a child process that overlaps the classifier's training, or
    None when the text alignment is off."""
    if not config.concept.enabled:
        return None
    from pivotmap.models import grounding
    from pivotmap.models.text_align import SENTENCES_PER_PIXEL, EmbeddingJob, descriptor_sentences

    texts = [p for c in nomenclature.classes for p in c.phrasings] + list(config.concept.prompts)
    texts += grounding.vocabulary_texts([c.description for c in nomenclature.classes])
    x = data.x.subset(_alignment_pixels(data, config))
    sentences, _ = descriptor_sentences(x, data.spec, SENTENCES_PER_PIXEL, config.train.seed)
    return EmbeddingJob(texts + sentences)


def _alignment_pixels(data: TrainingData, config: RunConfig) -> np.ndarray:
    """The training pixels the text-alignment head learns from (a class-stratified sample)."""
    cc, seed = config.concept, config.train.seed
    return data.train_idx[stratified_sample(data.codes[data.train_idx], cc.max_pixels, seed)]


def align_text(data: TrainingData, model, nomenclature: Nomenclature, job, config: RunConfig):
    """The text-alignment head on the frozen encoder, with its zero-shot figures."""
    import copy

    from pivotmap.models.text_align import build_alignment

    cc, seed = config.concept, config.train.seed
    train = _alignment_pixels(data, config)
    test = np.flatnonzero(data.is_test)
    x, y, frozen = data.x, data.y, copy.deepcopy(model).cpu()
    return build_alignment(
        frozen, nomenclature, job.result(), x.subset(train), y[train], x.subset(test), y[test],
        steps=cc.steps, seed=seed,
    )  # fmt: skip


def evaluate(model, data: TrainingData, device: str) -> dict:
    """Scores of a network (or ensemble) on the held-out pixels, with its size and cost; an
    ensemble's also say how its members' agreement relates to its accuracy (`agreement`)."""
    x = data.x.subset(np.flatnonzero(data.is_test))
    proba, agreement = predict_vote(model, x, 8192, device)
    predicted = np.asarray(model.spec.classes)[proba.argmax(1)]
    truth = data.codes[data.is_test]
    scores = metrics(truth, predicted, model.spec.classes)
    scores["parameters"] = count_parameters(model)
    scores["flops_per_pixel"] = flops_per_pixel(model.spec)
    if agreement is not None:
        scores["agreement"] = agreement_figures(agreement, predicted == truth)
    return scores


def agreement_figures(agreement: np.ndarray, correct: np.ndarray) -> dict:
    """Mean agreement of held-out pixels, the share where every member agrees, and the
    accuracy there and elsewhere (None where there is no such pixel)."""
    unanimous = agreement >= 1.0

    def accuracy(where: np.ndarray) -> float | None:
        return round(float(correct[where].mean()), 4) if where.any() else None

    return {
        "mean": round(float(agreement.mean()), 4) if len(agreement) else None,
        "unanimous_share": round(float(unanimous.mean()), 4) if len(agreement) else None,
        "overall_accuracy_unanimous": accuracy(unanimous),
        "overall_accuracy_split": accuracy(~unanimous),
    }


def member_spread(members: list[dict], seeds: list[int]) -> dict:
    """OA and macro-F1 of each ensemble member on the held-out pixels: mean, std, min, max."""
    out: dict = {"members": len(members), "seeds": seeds}
    for key in ("overall_accuracy", "macro_f1"):
        values = np.array([m[key] for m in members], dtype=float)
        out[key] = {
            "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4), "max": round(float(values.max()), 4),
            "per_member": [round(float(v), 4) for v in values],
        }  # fmt: skip
    return out


@dataclass(frozen=True)
class Trained:
    """The networks one run trained and their held-out scores (the baseline's too)."""

    model: Any  # one network, or an ensemble of `train.ensemble_members`
    losses: list[float]  # the first member's
    scores: dict
    pretrained: dict | None
    alignment: Any  # text_align.Alignment or None
    student_model: Any
    student: dict | None
    baseline: dict | None
    members: dict | None = None  # an ensemble's members' spread (`member_spread`)


def fit_models(
    data: TrainingData, config: RunConfig, device: str, nomenclature, text_job, step: Step
) -> Trained:
    """Pretrain, train, align and distil under the configured CPU threads; then the forest."""
    tc = config.train
    threads = tc.cpu_threads
    if device == "cpu" and threads is None:
        threads = fastest_threads(data.spec, data.x.subset(data.train_idx), tc.batch_size)
        run_logger("train").info("training on %d CPU thread(s): the fastest here", threads)
    with cpu_threads(device, threads):
        fits, pretrained = train_members(data, tc, device, step)
        model = ensemble_of([f.model for f in fits])
        scores = evaluate(model, data, device)
        members = None
        if len(fits) > 1:
            seeds = [member_config(tc, i).seed for i in range(len(fits))]
            members = member_spread([evaluate(f.model, data, device) for f in fits], seeds)
            members["final_loss"] = [round(f.losses[-1], 4) for f in fits]
        alignment = None
        if text_job:
            alignment = step(align_text)(data, model, nomenclature, text_job, config)
        student_model = student = None
        if tc.distill_epochs:
            student_model = step(distil_student)(data, model, tc, device).model
            student = evaluate(student_model, data, device)
    baseline = step(random_forest_baseline)(data, tc) if tc.baseline_trees else None
    return Trained(
        model=model, losses=fits[0].losses, scores=scores, pretrained=pretrained,
        alignment=alignment, student_model=student_model, student=student, baseline=baseline,
        members=members,
    )  # fmt: skip


# ---------------------------------------------------------------------------- what is recorded
def validation_key(samples: list[SampleResult], holdout: int | None = None) -> str:
    """Names the held-out data: the training tables (their keys name labels, split and cube) and,
    with `train.holdout`, which table is held out whole."""
    named = "/".join(s.key for s in samples) + ("" if holdout is None else f"/holdout={holdout}")
    return hashlib.sha256(named.encode()).hexdigest()[:16]


def confusion_figures(
    ws: Workspace,
    names: dict[int, str],
    classes: tuple[int, ...],
    results: dict[str, dict],
    folder: Path,
) -> dict[str, Path]:
    """One confusion-matrix PNG per evaluated model, drawn in local `folder` (for MLflow) and
    kept under the run's reports/; {artifact name: local path}."""
    labels = [names.get(c, str(c)) for c in classes]
    out = {}
    for label, scores in results.items():
        name = f"confusion_{label}"
        title = f"{label}: OA {scores['overall_accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"
        path = confusion_png(scores["confusion_matrix"], labels, folder / f"{name}.png", title)
        ws.write_report_file(path.name, path.read_bytes())
        out[name] = path
    return out


def run_params(ws: Workspace, data: TrainingData, device: str, cube_version: str) -> dict:
    """What MLflow records as the run's parameters: config, data sizes, cube and code versions."""
    tc, config = ws.config.train, ws.config
    return {
        **tc.model_dump(mode="json"),
        "n_train_pixels": len(data.train_idx),
        "n_test_pixels": int(data.is_test.sum()),
        "n_unlabelled_pixels": len(data.x_unlabelled),
        "n_steps": data.spec.n_steps,
        "cube_url": ws.pivot_url,
        "cube_version": cube_version,
        "labels": ", ".join(s.url for s in config.labels.all_sources) if config.labels else "",
        "training_tables": ", ".join(samples_tables(ws)),
        "config_hash": config.config_hash(),
        "software_version": __version__,
        "code_version": code_version(__version__),
        "device": device,
    }


def run_metrics(
    scores: dict,
    baseline: dict | None,
    student: dict | None,
    names: dict[int, str],
    members: dict | None = None,
) -> dict:
    """Model, baseline (`rf_…`) and student (`student_…`) scores as flat MLflow metrics; per
    class F1 named by code and class name (`f1_3_grassland`); for an ensemble, its members'
    spread (`members_macro_f1_std`, …, `member_macro_f1_0`, …) and agreement."""
    out = {k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
    out["f1"] = named_f1(scores["per_class_f1"], names)
    out |= {"parameters": scores["parameters"], "flops_per_pixel": scores["flops_per_pixel"]}
    for prefix, other in (("rf", baseline), ("student", student)):
        if other:
            out |= {f"{prefix}_{k}": other[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
            out[f"{prefix}_f1"] = named_f1(other["per_class_f1"], names)
    if members:
        out["ensemble_members"] = members["members"]
        for key in ("overall_accuracy", "macro_f1"):
            stats = members[key]
            out[f"members_{key}"] = {s: stats[s] for s in ("mean", "std", "min", "max")}
            out[f"member_{key}"] = dict(enumerate(stats["per_member"]))
        figures = scores.get("agreement") or {}
        out["agreement"] = {k: v for k, v in figures.items() if v is not None}
    return out


def named_f1(per_class: dict[str, float], names: dict[int, str]) -> dict[str, float]:
    """Per-class F1 keyed `CODE_name` (a metric name MLflow accepts), e.g. `3_grassland`."""
    import re

    def key(code: str) -> str:
        name = re.sub(r"[^a-z0-9]+", "_", names.get(int(code), "").lower()).strip("_")
        return f"{code}_{name}" if name else code

    return {key(code): f1 for code, f1 in per_class.items()}


def alignment_metrics(alignment) -> dict:
    """Zero-shot figures as MLflow metrics (`zs_…`); none without an alignment."""
    if alignment is None:
        return {}
    keys: tuple[str, ...] = (
        "seen_top1",
        "heldout_top1",
        "heldout_top1_class_mean",
        "chance_top1",
        "null_heldout_top1",
    )
    keys += ("heldout_mean_rank", "chance_mean_rank")
    out = {f"zs_{k}": alignment.zero_shot[k] for k in keys}
    grounded = alignment.zero_shot.get("grounded") or {}
    from pivotmap.models.grounding import FIGURES

    for k in (*FIGURES, "null_top1", "null_auc_class_mean"):
        if grounded.get(k) is not None:
            out[f"zs_grounded_{k}"] = grounded[k]
    return out


def mlflow_target(ws: Workspace) -> dict:
    """Where the run's MLflow records go: tracking URI, artifact root and experiment."""
    from pivotmap.models.registry import tracking_uri_for

    return {
        "tracking_uri": tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri),
        "artifact_root": ws.url("mlflow", "artifacts"),
        "experiment": f"pivotmap-{ws.config.name}",
    }


def register(
    ws: Workspace,
    model,
    data: TrainingData,
    key: str,
    params: dict,
    flat: dict,
    figures: dict[str, Path],
    alignment=None,
    started_at: float | None = None,
) -> RegisteredModel:
    """Log the run (params, metrics, confusion PNGs, input signature) and register the model
    (one network or an ensemble: its spec says which) with the legend and cube settings it was
    trained on (and its text-alignment head when there is one): predict elsewhere needs no
    labels and refuses a cube built otherwise."""
    from pivotmap.models.registry import log_and_register

    with tempfile.TemporaryDirectory() as tmp:
        files = alignment.save(Path(tmp)) if alignment else {}
        if ws.config.labels is not None:
            files["nomenclature"] = Path(ws.config.labels.nomenclature)
        return log_and_register(
            **mlflow_target(ws),
            model_name=ws.config.model_name,
            model=model.cpu(),
            spec=model.spec,
            params=params,
            metrics=flat,
            validation_key=key,
            artifacts=figures,
            tags={"pivotmap.role": "model", "pivotmap.code_version": params["code_version"]},
            input_example=data.x[:4],
            model_files=files or None,
            cube_settings=trained_cube_settings(ws, model.spec),
            run_name=f"{ws.config.name}: train",
            started_at=started_at,
        )


def trained_cube_settings(ws: Workspace, spec: ModelSpec) -> dict[str, str]:
    """The settings of the cube the model learnt from (its root attributes; the config's
    `pivot` section for a cube that records none) and what the model reads of it."""
    from pivotmap.models import cube_settings
    from pivotmap.tasks.pivot import cube_attrs

    pivot = cube_settings.pivot_settings(cube_attrs(ws.pivot_url))
    pivot = pivot or cube_settings.config_settings(ws.config.pivot)
    return cube_settings.training_settings(pivot, spec)


def register_student(
    ws: Workspace,
    student,
    data: TrainingData,
    key: str,
    teacher: dict,
    scores: dict,
    names: dict[int, str],
    started_at: float | None = None,
) -> RegisteredModel:
    """Register the distilled student as `<model name>-student`, with its gap to the teacher."""
    from pivotmap.models.registry import log_and_register

    flat = {k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
    flat |= {"f1": named_f1(scores["per_class_f1"], names), "parameters": scores["parameters"]}
    flat["macro_f1_gap_to_teacher"] = teacher["macro_f1"] - scores["macro_f1"]
    return log_and_register(
        **mlflow_target(ws),
        model_name=f"{ws.config.model_name}-student",
        model=student.cpu(),
        spec=student.spec,
        params={"teacher_model": ws.config.model_name, "cube_url": ws.pivot_url},
        metrics=flat,
        validation_key=key,
        tags={"pivotmap.role": "student"},
        input_example=data.x[:4],
        run_name=f"{ws.config.name}: distilled student",
        started_at=started_at,
    )


@dataclass(frozen=True)
class TrainOutcome:
    """What one training run produced: the data it used, what it trained, registered versions."""

    data: TrainingData
    trained: Trained
    registered: RegisteredModel
    student_registered: RegisteredModel | None
    validation_key: str
    device: str
    cube_version: str


def record(
    ws: Workspace,
    data: TrainingData,
    trained: Trained,
    names: dict[int, str],
    key: str,
    device: str,
    cube_version: str,
    started_at: float | None = None,
) -> TrainOutcome:
    """Confusion figures, the MLflow run (dated from `started_at`, when training began) and
    the registered model (and student) versions."""
    scores, baseline, student = trained.scores, trained.baseline, trained.student
    evaluated = {"model": scores} | ({"random_forest": baseline} if baseline else {})
    flat = run_metrics(scores, baseline, student, names, trained.members)
    flat |= alignment_metrics(trained.alignment)
    with tempfile.TemporaryDirectory() as tmp:
        figures = confusion_figures(ws, names, data.spec.classes, evaluated, Path(tmp))
        params = run_params(ws, data, device, cube_version)
        registered = register(
            ws, trained.model, data, key, params, flat, figures, trained.alignment, started_at
        )
    student_registered = None
    if student:
        student_registered = register_student(
            ws, trained.student_model, data, key, scores, student, names, started_at
        )
    return TrainOutcome(
        data=data, trained=trained, registered=registered, student_registered=student_registered,
        validation_key=key, device=device, cube_version=cube_version,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the stage
def train(ws: Workspace, device: str | None = None, step: Step = _as_is) -> TrainResult:
    """Split labels spatially, (pre)train on the pivot cube, compare with a random forest,
    evaluate on held-out blocks, register; the result is kept in the run folder.

    `step` wraps each training step (the flow makes them Prefect tasks)."""
    started, began = time.monotonic(), time.time()
    config, dev = ws.config, pick_device(device)
    if config.labels is None:
        raise TrainingDataError(
            f"config {config.name!r} has no `labels` section: training needs reference data"
        )
    nomenclature = load_nomenclature(config.labels.nomenclature)
    cube_version = ws.read_result(PivotResult).cube_version
    samples = samples_of(ws)
    if samples[0].cube_version != cube_version:
        raise TrainingDataError(
            f"the training table {samples[0].table} was drawn from cube version "
            f"{samples[0].cube_version}; the pivot cube is now {cube_version}: run "
            f"`pivotmap sample --config FILE --out {ws.root}` again"
        )
    data = step(load_training_data)(config, samples)
    text_job = start_text_embedding(nomenclature, config, data)  # overlaps training (issue 9)
    trained = fit_models(data, config, dev, nomenclature, text_job, step)
    key = validation_key(samples, config.train.holdout_table())
    names = {c.code: c.name for c in nomenclature.classes}
    outcome = record(ws, data, trained, names, key, dev, cube_version, began)
    r, scores = outcome.registered, trained.scores
    run_logger("train").info(
        "model %s v%s: OA %.3f macro-F1 %.3f (%s)",
        r.name, r.version, scores["overall_accuracy"], scores["macro_f1"], r.reason,
    )  # fmt: skip
    if m := trained.members:
        run_logger("train").info(
            "ensemble of %d: members' OA %.3f ± %.3f, macro-F1 %.3f ± %.3f (mean ± std)",
            m["members"], m["overall_accuracy"]["mean"], m["overall_accuracy"]["std"],
            m["macro_f1"]["mean"], m["macro_f1"]["std"],
        )  # fmt: skip
    result = train_result(ws, outcome, duration_s=round(time.monotonic() - started, 2))
    ws.write_result(result)
    return result


def _student_summary(student: dict, teacher: dict, registered: RegisteredModel) -> dict:
    out = headline(student) | {k: student[k] for k in ("parameters", "flops_per_pixel")}
    out["macro_f1_gap"] = round(teacher["macro_f1"] - student["macro_f1"], 4)
    out["overall_accuracy_gap"] = round(
        teacher["overall_accuracy"] - student["overall_accuracy"], 4
    )
    out |= {"model_name": registered.name, "model_version": registered.version}
    return out


def _pretraining_summary(pretrained: dict | None, tc: TrainConfig) -> dict | None:
    if pretrained is None:
        return None
    return {
        "epochs": tc.pretrain_epochs,
        "unlabelled_pixels": pretrained["pixels"],
        "final_loss": round(pretrained["losses"][-1], 4),
    }


def _ensemble_summary(members: dict | None, scores: dict) -> dict | None:
    """The members' spread and the ensemble's agreement on the held-out pixels."""
    if members is None:
        return None
    return members | {"agreement": scores.get("agreement")}


def _baseline_summary(baseline: dict | None) -> dict | None:
    if baseline is None:
        return None
    return headline(baseline) | {k: baseline[k] for k in ("model", "features", "confusion_matrix")}


def train_result(ws: Workspace, outcome: TrainOutcome, duration_s: float) -> TrainResult:
    """The stage's typed result: what the CLI prints and reports/train.json keeps."""
    tc, o, t = ws.config.train, outcome, outcome.trained
    data, scores, registered = o.data, t.scores, o.registered
    return TrainResult(
        **headline(scores),
        n_test_pixels=scores["n_test_pixels"],
        confusion_matrix=scores["confusion_matrix"],
        classes=list(data.spec.classes),
        baseline=_baseline_summary(t.baseline),
        student=None
        if t.student is None or o.student_registered is None
        else _student_summary(t.student, scores, o.student_registered),
        pretraining=_pretraining_summary(t.pretrained, tc),
        ensemble=_ensemble_summary(t.members, scores),
        n_train_pixels=len(data.train_idx),
        label_fraction=tc.label_fraction,
        split=f"whole polygons or blocks of {tc.block_size} px, {tc.test_fraction:.0%} held out"
        if tc.holdout is None
        else f"run {tc.holdout} held out whole (another region or year); the others train",
        model_name=registered.name,
        model_version=registered.version,
        run_id=registered.run_id,
        model_uri=registered.uri,
        promoted=registered.promoted,
        promotion_reason=registered.reason,
        champion_version=registered.champion_version,
        validation_key=o.validation_key,
        parameters=scores["parameters"],
        flops_per_pixel=scores["flops_per_pixel"],
        n_steps=data.spec.n_steps,
        cube_url=ws.pivot_url,
        cube_version=o.cube_version,
        code_version=code_version(__version__),
        device=o.device,
        final_loss=round(t.losses[-1], 4),
        text_alignment=t.alignment.zero_shot if t.alignment else None,
        duration_s=duration_s,
    )
