"""Accuracy on held-out pixels, the confusion-matrix figure, inference speed and code version."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[int, ...]) -> dict:
    """Overall accuracy, macro-F1, Cohen's kappa, per-class F1 and the confusion matrix.

    Macro-F1 averages the classes present in the reference (`y_true`) only: a class of the
    model that the reference lacks (another region or year without it) is listed under
    `classes_absent`, and the pixels predicted as such a class under `predicted_absent`
    ({code: pixels}), instead of a silent 0 in the average. Its per-class F1 stays 0."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

    labels = list(classes)
    present = [c for c in labels if np.any(y_true == c)] or labels
    absent = [c for c in labels if c not in present]
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "overall_accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=labels)),
        "per_class_f1": {str(c): float(f) for c, f in zip(labels, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_test_pixels": int(len(y_true)),
        "classes_absent": absent,
        "predicted_absent": {str(c): int(np.sum(y_pred == c)) for c in absent},
    }


def headline(scores: dict) -> dict:
    """The scores a summary shows side by side: OA, macro-F1, kappa, per-class F1."""
    return {k: scores[k] for k in ("overall_accuracy", "macro_f1", "kappa", "per_class_f1")}


def confusion_png(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    """Write the confusion matrix (rows: reference, columns: predicted) as a PNG with counts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    recall = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 1.2 + 0.8 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        colour = "white" if recall[i, j] > 0.6 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=9)
    ticks = range(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="reference", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    fig.colorbar(image, ax=ax, label="share of the reference class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def code_version(package_version: str) -> str:
    """The git commit of the source tree (`+dirty` when it has uncommitted changes), else the
    package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel")).resolve() != root:
            return package_version  # installed copy inside some other repository
        sha = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return package_version
    return f"{sha}+dirty" if dirty else sha


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, env=env
    )
    if done.returncode != 0:
        raise subprocess.SubprocessError(done.stderr.strip())
    return done.stdout.strip()


def pixels_per_second_per_core(model, x: np.ndarray, batch_size: int = 4096) -> float:
    """CPU inference speed of `model` on inputs `x`, measured on one thread (best of 3)."""
    import torch

    from pivotmap.models.training import predict_proba

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.cpu().eval()
        predict_proba(model, x[:64], batch_size)  # warm-up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            predict_proba(model, x, batch_size)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return len(x) / best
