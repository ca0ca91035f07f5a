"""Train flow: labels on the grid + pivot cube → a fused S1/S2 classifier, measured and registered.

Steps, each a Prefect task (training runs wherever the flow runs: on a GPU work pool's worker it
uses CUDA with bf16 autocast, elsewhere the CPU):

1. split the labels in spatial blocks; read the labelled pixels and a sample of unlabelled ones
   (never from held-out blocks);
2. optionally pretrain the encoders by masked reconstruction on the unlabelled pixels;
3. train the classifier (from the pretrained encoders when there are some);
4. a random forest on temporal features of the same pixels and split (the baseline);
5. optionally distil a smaller student;
6. log everything to MLflow, register the model (and the student) and move @champion only when
   the candidate wins on the same held-out data.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from pivotmap import __version__
from pivotmap.config import RunConfig, TrainConfig
from pivotmap.flows.report import stage_artifacts
from pivotmap.flows.workspace import Workspace
from pivotmap.models.evaluation import code_version, confusion_png, headline, metrics
from pivotmap.models.features import (
    day_of_year,
    fit_normalisation,
    has_data,
    network_input,
    raw_series,
    sampled,
)
from pivotmap.models.network import ModelSpec, count_parameters, flops_per_pixel
from pivotmap.models.training import (
    label_subset,
    pick_device,
    predict_proba,
    spatial_block_split,
    stratified_sample,
)
from pivotmap.tasks import cube
from pivotmap.tasks.labels import UNKNOWN, read_labels
from pivotmap.tasks.nomenclature import load_nomenclature


class TrainingDataError(ValueError):
    """Too few labelled pixels or classes to train and evaluate a model."""


@dataclass(frozen=True)
class TrainingData:
    """Network inputs and raw series of the labelled pixels, their split, and unlabelled inputs."""

    spec: ModelSpec  # with normalisation fitted on the training pixels
    series: np.ndarray  # [N, T, C] raw labelled series (NaN = missing), for the baseline
    x: np.ndarray  # [N, T, C'] network inputs of the labelled pixels
    codes: np.ndarray  # [N] class codes
    is_test: np.ndarray  # [N] in a held-out block
    train_idx: np.ndarray  # indices of the labelled pixels used for training
    x_unlabelled: np.ndarray  # [U, T, C'] pixels outside held-out blocks, labels unused

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.spec.classes)}
        return np.array([index[c] for c in self.codes], dtype=np.int64)


@contextlib.contextmanager
def cpu_threads(device: str, threads: int | None) -> Iterator[None]:
    """Limit torch's CPU threads while training (a no-op on CUDA or when `threads` is None)."""
    before = torch.get_num_threads()
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def held_out_area(test_mask: np.ndarray, block: int) -> np.ndarray:
    """Every pixel of a block holding a test pixel: unlabelled data is never taken from there."""
    h, w = test_mask.shape
    by, bx = -(-h // block), -(-w // block)
    padded = np.zeros((by * block, bx * block), dtype=bool)
    padded[:h, :w] = test_mask
    blocks = padded.reshape(by, block, bx, block).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, block, 0), block, 1)[:h, :w]


def read_pixels(
    ws: Workspace,
    labels: np.ndarray,
    excluded: np.ndarray,
    channels: tuple[str, ...],
    tc: TrainConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw series and codes of the labelled pixels, their flat indices in the extent, a seeded
    sample of unlabelled pixels with data outside `excluded`, and the days of year."""
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    pivot = cube.open_cube(ws.pivot_url)
    rng = np.random.default_rng(tc.seed)
    wanted = tc.pretrain_epochs or tc.distill_epochs
    quota = -(-tc.max_unlabelled_pixels // len(tiles)) if wanted else 0
    flat_index = np.arange(labels.size).reshape(labels.shape)
    xs, ys, where, unl, doy = [], [], [], [], None
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        tile_labels, tile_excluded = labels[rows, cols].ravel(), excluded[rows, cols].ravel()
        keep = tile_labels != UNKNOWN
        if not keep.any() and not quota:
            continue
        ds = sampled(cube.read_tile(pivot, tile), tc.step_days)
        doy, series = day_of_year(ds), raw_series(ds, channels)
        xs.append(series[keep])
        ys.append(tile_labels[keep])
        where.append(flat_index[rows, cols].ravel()[keep])
        free = np.flatnonzero(~keep & ~tile_excluded & has_data(series))
        unl.append(series[rng.permutation(free)[:quota]])
    if not xs or not sum(len(c) for c in ys):
        raise TrainingDataError(
            "no labelled pixel inside the region: check `labels.url` and `region`"
        )
    return (*(np.concatenate(a) for a in (xs, ys, where, unl)), doy)


@task(cache_policy=NONE)
def prepare_data(ws: Workspace, labels: np.ndarray, test_mask: np.ndarray) -> TrainingData:
    """Read the pixels, fit the normalisation on the training pixels, build network inputs."""
    tc = ws.config.train
    classes = tuple(int(c) for c in np.unique(labels[labels != UNKNOWN]))
    base = ModelSpec(
        classes=classes, step_days=tc.step_days, hidden=tc.hidden, modalities=tc.modalities
    )
    excluded = held_out_area(test_mask, tc.block_size)
    series, codes, flat, unlabelled, doy = read_pixels(ws, labels, excluded, base.channels[:-2], tc)
    is_test = test_mask.ravel()[flat]
    spec = fit_normalisation(series[~is_test], base).replace(n_steps=int(series.shape[1]))
    train_idx = np.flatnonzero(~is_test)
    train_idx = train_idx[stratified_sample(codes[train_idx], tc.max_train_pixels, tc.seed)]
    train_idx = train_idx[label_subset(codes[train_idx], tc.label_fraction, tc.seed)]
    pool = np.concatenate([unlabelled, series[~is_test]])  # labels unused for pretraining
    pool = pool[np.random.default_rng(tc.seed).permutation(len(pool))[: tc.max_unlabelled_pixels]]
    return TrainingData(
        spec=spec,
        series=series,
        x=network_input(series, doy, spec),
        codes=codes,
        is_test=is_test,
        train_idx=train_idx,
        x_unlabelled=network_input(pool, doy, spec),
    )


@task(cache_policy=NONE)
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


@task(cache_policy=NONE)
def train_classifier(data: TrainingData, tc: TrainConfig, device: str, init_state=None):
    """Supervised training on the training pixels (from pretrained encoders if given)."""
    from pivotmap.models.training import fit

    idx = data.train_idx
    return fit(
        data.x[idx],
        data.y[idx],
        data.spec,
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        device=device,
        init_state=init_state,
        init_lr_scale=tc.pretrain_lr_scale,
    )


@task(cache_policy=NONE)
def random_forest_baseline(data: TrainingData, tc: TrainConfig) -> dict:
    """The random forest on temporal features, same pixels and split; its scores."""
    from pivotmap.models.baseline import fit_random_forest, temporal_features

    started = time.monotonic()
    features = temporal_features(data.series, data.spec.channels[:-2], tc.baseline_every)
    forest = fit_random_forest(
        features[data.train_idx], data.codes[data.train_idx], trees=tc.baseline_trees, seed=tc.seed
    )
    predicted = forest.predict(features[data.is_test])
    scores = metrics(data.codes[data.is_test], predicted, data.spec.classes)
    return {
        **scores,
        "model": f"RandomForestClassifier({tc.baseline_trees} trees, class-balanced)",
        "features": int(features.shape[1]),
        "duration_s": round(time.monotonic() - started, 2),
    }


@task(cache_policy=NONE)
def distil_student(data: TrainingData, teacher, tc: TrainConfig, device: str):
    """A smaller student trained on the teacher's soft predictions (all non-test pixels)."""
    from pivotmap.models.distill import distill, student_spec

    y_pool = np.full(len(data.x_unlabelled), -1)
    x = np.concatenate([data.x[data.train_idx], data.x_unlabelled])
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


def start_text_embedding(nomenclature, config: RunConfig):
    """Embed every class phrasing and configured prompt in a child process, or None when the
    text alignment is off."""
    if not config.concept.enabled:
        return None
    from pivotmap.models.text_align import EmbeddingJob

    texts = [p for c in nomenclature.classes for p in c.phrasings] + list(config.concept.prompts)
    return EmbeddingJob(texts)


@task(cache_policy=NONE)
def align_text(data: TrainingData, model, nomenclature, job, config: RunConfig):
    """The text-alignment head on the frozen encoder, with its zero-shot figures."""
    import copy

    from pivotmap.models.text_align import build_alignment

    cc, seed = config.concept, config.train.seed
    train = data.train_idx[stratified_sample(data.codes[data.train_idx], cc.max_pixels, seed)]
    test = np.flatnonzero(data.is_test)
    x, y, frozen = data.x, data.y, copy.deepcopy(model).cpu()
    return build_alignment(
        frozen, nomenclature, job.result(), x[train], y[train], x[test], y[test],
        steps=cc.steps, seed=seed,
    )  # fmt: skip


def alignment_metrics(alignment) -> dict:
    """Zero-shot figures as MLflow metrics (`zs_…`); none without an alignment."""
    if alignment is None:
        return {}
    keys = (
        "seen_top1",
        "heldout_top1",
        "heldout_top1_class_mean",
        "chance_top1",
        "null_heldout_top1",
    )
    keys += ("heldout_mean_rank", "chance_mean_rank")
    return {f"zs_{k}": alignment.zero_shot[k] for k in keys}


def evaluate(model, data: TrainingData, device: str) -> dict:
    """Scores of a network on the held-out pixels, with its size and cost."""
    proba = predict_proba(model, data.x[data.is_test], 8192, device)
    predicted = np.asarray(model.spec.classes)[proba.argmax(1)]
    scores = metrics(data.codes[data.is_test], predicted, model.spec.classes)
    scores["parameters"] = count_parameters(model)
    scores["flops_per_pixel"] = flops_per_pixel(model.spec)
    return scores


def validation_key(labels_url: str, test_mask: np.ndarray, cube_version: str) -> str:
    """Names the held-out data: same labels file, same split, same cube."""
    digest = hashlib.sha256(
        Path(labels_url).read_bytes() if Path(labels_url).is_file() else labels_url.encode()
    )
    digest.update(np.packbits(test_mask).tobytes())
    digest.update(cube_version.encode())
    return digest.hexdigest()[:16]


def confusion_figures(
    ws: Workspace, names: dict[int, str], classes: tuple[int, ...], results: dict[str, dict]
) -> dict:
    """One confusion-matrix PNG per evaluated model, under reports/; {artifact name: path}."""
    labels = [names.get(c, str(c)) for c in classes]
    out = {}
    for label, scores in results.items():
        path = ws.reports_dir / f"confusion_{label}.png"
        title = f"{label}: OA {scores['overall_accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"
        out[f"confusion_{label}"] = confusion_png(scores["confusion_matrix"], labels, path, title)
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
        "labels_url": config.labels.url,
        "config_hash": config.config_hash(),
        "software_version": __version__,
        "code_version": code_version(__version__),
        "device": device,
    }


def run_metrics(scores: dict, baseline: dict | None, student: dict | None) -> dict:
    """Model, baseline (`rf_…`) and student (`student_…`) scores as flat MLflow metrics."""
    out = {k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
    out["f1"] = scores["per_class_f1"]
    out |= {"parameters": scores["parameters"], "flops_per_pixel": scores["flops_per_pixel"]}
    for prefix, other in (("rf", baseline), ("student", student)):
        if other:
            out |= {f"{prefix}_{k}": other[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
            out[f"{prefix}_f1"] = other["per_class_f1"]
    return out


@flow(name="train")
def train_flow(config: RunConfig, out_dir: str, device: str | None = None) -> dict:
    """Split labels spatially, (pre)train on the pivot cube, compare with a random forest,
    evaluate on held-out blocks, register."""
    started = time.monotonic()
    logger = get_run_logger()
    ws = Workspace.open(config, out_dir)
    if config.labels is None:
        raise TrainingDataError(
            f"config {config.name!r} has no `labels` section: training needs reference data"
        )
    nomenclature = load_nomenclature(config.labels.nomenclature)
    labels = read_labels(config.labels.url, ws.extent(ws.tiles()), nomenclature)
    tc, dev = config.train, pick_device(device)
    if len(np.unique(labels[labels != UNKNOWN])) < 2:
        raise TrainingDataError(
            f"labels {config.labels.url} hold fewer than two classes inside the region"
        )
    test_mask = spatial_block_split(labels, tc.block_size, tc.test_fraction, tc.seed)
    text_job = start_text_embedding(nomenclature, config)  # overlaps training (issue 9)
    data = prepare_data(ws, labels, test_mask)
    with cpu_threads(dev, tc.cpu_threads):
        pretrained = pretrain_encoder(data, tc, dev) if tc.pretrain_epochs else None
        fitted = train_classifier(data, tc, dev, pretrained["state"] if pretrained else None)
        scores = evaluate(fitted.model, data, dev)
        alignment = (
            align_text(data, fitted.model, nomenclature, text_job, config) if text_job else None
        )
        student = None
        if tc.distill_epochs:
            student_model = distil_student(data, fitted.model, tc, dev).model
            student = evaluate(student_model, data, dev)
    baseline = random_forest_baseline(data, tc) if tc.baseline_trees else None
    cube_version = ws.read_report("pivot")["cube_version"]
    key = validation_key(config.labels.url, test_mask, cube_version)
    names = {c.code: c.name for c in nomenclature.classes}
    evaluated = {"model": scores} | ({"random_forest": baseline} if baseline else {})
    figures = confusion_figures(ws, names, data.spec.classes, evaluated)
    registered = register(
        ws,
        fitted.model,
        data,
        key,
        run_params(ws, data, dev, cube_version),
        run_metrics(scores, baseline, student) | alignment_metrics(alignment),
        figures,
        alignment,
    )
    student_registered = (
        register_student(ws, student_model, data, key, scores, student) if student else None
    )
    logger.info(
        "model %s v%s: OA %.3f macro-F1 %.3f (%s)",
        registered.name,
        registered.version,
        scores["overall_accuracy"],
        scores["macro_f1"],
        registered.reason,
    )
    outcome = TrainOutcome(
        data=data, scores=scores, baseline=baseline, student=student, pretrained=pretrained,
        registered=registered, student_registered=student_registered, validation_key=key,
        losses=fitted.losses, device=dev, cube_version=cube_version,
    )  # fmt: skip
    summary = train_summary(ws, outcome)
    summary["text_alignment"] = alignment.zero_shot if alignment else None
    summary["duration_s"] = round(time.monotonic() - started, 2)
    ws.write_report("train", summary)
    stage_artifacts("train", summary, config.name, ws.reports_dir)
    return summary


def _mlflow_target(ws: Workspace) -> dict:
    from pivotmap.models.registry import tracking_uri_for

    return {
        "tracking_uri": tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri),
        "artifact_root": ws.mlflow_dir / "artifacts",
        "experiment": f"pivotmap-{ws.config.name}",
    }


def register(
    ws, model, data: TrainingData, key: str, params: dict, flat: dict, figures: dict, alignment=None
):
    """Log the run (params, metrics, confusion PNGs, input signature) and register the model
    (with its text-alignment head when there is one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = alignment.save(Path(tmp)) if alignment else None
        return _log_and_register(ws, model, data, key, params, flat, figures, files)


def _log_and_register(ws, model, data, key, params, flat, figures, files):
    from pivotmap.models.registry import log_and_register

    return log_and_register(
        **_mlflow_target(ws),
        model_name=ws.config.model_name,
        model=model.cpu(),
        spec=data.spec,
        params=params,
        metrics=flat,
        validation_key=key,
        artifacts=figures,
        tags={"pivotmap.role": "model", "pivotmap.code_version": params["code_version"]},
        input_example=data.x[:4],
        model_files=files,
    )


def register_student(ws, student, data: TrainingData, key: str, teacher: dict, scores: dict):
    """Register the distilled student as `<model name>-student`, with its gap to the teacher."""
    from pivotmap.models.registry import log_and_register

    flat = {k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa")}
    flat |= {"f1": scores["per_class_f1"], "parameters": scores["parameters"]}
    flat["macro_f1_gap_to_teacher"] = teacher["macro_f1"] - scores["macro_f1"]
    return log_and_register(
        **_mlflow_target(ws),
        model_name=f"{ws.config.model_name}-student",
        model=student.cpu(),
        spec=student.spec,
        params={"teacher_model": ws.config.model_name, "cube_url": ws.pivot_url},
        metrics=flat,
        validation_key=key,
        tags={"pivotmap.role": "student"},
        input_example=data.x[:4],
    )


def _student_summary(student: dict, teacher: dict, registered) -> dict:
    out = headline(student) | {k: student[k] for k in ("parameters", "flops_per_pixel")}
    out["macro_f1_gap"] = round(teacher["macro_f1"] - student["macro_f1"], 4)
    out["overall_accuracy_gap"] = round(
        teacher["overall_accuracy"] - student["overall_accuracy"], 4
    )
    out |= {"model_name": registered.name, "model_version": registered.version}
    return out


@dataclass(frozen=True)
class TrainOutcome:
    """What one training run produced: the data it used, scores and registered versions."""

    data: Any
    scores: dict
    baseline: dict | None
    student: dict | None
    pretrained: dict | None
    registered: Any
    student_registered: Any
    validation_key: str
    losses: list[float]
    device: str
    cube_version: str


def train_summary(ws, outcome: TrainOutcome) -> dict:
    """The stage summary the CLI prints and reports/train.json keeps."""
    tc, o = ws.config.train, outcome
    data, scores, baseline, student = o.data, o.scores, o.baseline, o.student
    pretrained, registered, key = o.pretrained, o.registered, o.validation_key
    return {
        "stage": "train",
        **headline(scores),
        "n_test_pixels": scores["n_test_pixels"],
        "confusion_matrix": scores["confusion_matrix"],
        "classes": list(data.spec.classes),
        "baseline": None
        if baseline is None
        else headline(baseline)
        | {k: baseline[k] for k in ("model", "features", "confusion_matrix")},
        "student": None
        if student is None
        else _student_summary(student, scores, o.student_registered),
        "pretraining": None
        if pretrained is None
        else {
            "epochs": tc.pretrain_epochs,
            "unlabelled_pixels": pretrained["pixels"],
            "final_loss": round(pretrained["losses"][-1], 4),
        },
        "n_train_pixels": len(data.train_idx),
        "label_fraction": tc.label_fraction,
        "split": f"spatial blocks of {tc.block_size} px, {tc.test_fraction:.0%} held out",
        "model_name": registered.name,
        "model_version": registered.version,
        "run_id": registered.run_id,
        "model_uri": registered.uri,
        "promoted": registered.promoted,
        "promotion_reason": registered.reason,
        "champion_version": registered.champion_version,
        "validation_key": key,
        "parameters": scores["parameters"],
        "flops_per_pixel": scores["flops_per_pixel"],
        "n_steps": data.spec.n_steps,
        "cube_url": ws.pivot_url,
        "cube_version": o.cube_version,
        "code_version": code_version(__version__),
        "device": o.device,
        "final_loss": round(o.losses[-1], 4),
    }
