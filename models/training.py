"""Supervised training with a spatial block split, evaluation metrics and batched inference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pivotmap.models.network import ModelSpec, build_model


def pick_device(prefer: str | None = None) -> str:
    """CUDA when present (or asked for and present), else CPU."""
    if prefer == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def spatial_block_split(
    labels: np.ndarray, block: int, test_fraction: float, seed: int, unknown: int = 0
) -> np.ndarray:
    """Boolean test mask: whole `block`×`block` squares are held out, so no neighbouring pixel
    of a test pixel trains the model. Draws are repeated (seeded) until every class with labels
    in at least two blocks appears on both sides."""
    h, w = labels.shape
    by, bx = np.arange(h) // block, np.arange(w) // block
    block_id = by[:, None] * (bx.max() + 1) + bx[None, :]
    labelled = labels != unknown
    blocks = np.unique(block_id[labelled])
    n_test = max(1, round(len(blocks) * test_fraction))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labelled])
    best = None
    for _ in range(200):
        test_blocks = rng.choice(blocks, size=n_test, replace=False)
        test = np.isin(block_id, test_blocks) & labelled
        train = ~np.isin(block_id, test_blocks) & labelled
        missing = sum(
            not (labels[test] == c).any() or not (labels[train] == c).any() for c in classes
        )
        if best is None or missing < best[0]:
            best = (missing, test)
        if missing == 0:
            break
    return best[1]


@dataclass(frozen=True)
class FitResult:
    model: nn.Module
    losses: list[float]


def fit(
    x: np.ndarray,
    y_idx: np.ndarray,
    spec: ModelSpec,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
) -> FitResult:
    """Train a fresh network on [N, T, C] inputs and class indices; class-balanced loss."""
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    counts = np.bincount(y_idx, minlength=len(spec.classes)).astype(np.float32)
    weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=learning_rate, total_steps=epochs * max(1, -(-len(y_idx) // batch_size))
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y_idx.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            optimiser.zero_grad()
            loss = loss_fn(model(xt[idx].to(device)), yt[idx].to(device))
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += loss.item() * len(idx)
        losses.append(total / len(order))
    model.eval()
    return FitResult(model=model, losses=losses)


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: np.ndarray, batch_size: int, device: str = "cpu"
) -> np.ndarray:
    """Softmax probabilities [N, K], batched; bf16 autocast on CUDA."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(xb)
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    if not out:
        return np.zeros((0, len(model.spec.classes)), dtype=np.float32)
    return np.concatenate(out)


def stratified_sample(codes: np.ndarray, max_total: int, seed: int) -> np.ndarray:
    """Indices of at most `max_total` samples shared equally between classes; a class smaller
    than its share is taken whole and its unused share goes to the others (water filling)."""
    if len(codes) <= max_total:
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(codes, return_counts=True)
    picks, remaining = [], max_total
    for rank, k in enumerate(np.argsort(counts, kind="stable")):
        take = min(counts[k], remaining // (len(classes) - rank))
        picks.append(rng.permutation(np.flatnonzero(codes == classes[k]))[:take])
        remaining -= take
    return np.sort(np.concatenate(picks))


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[int, ...]) -> dict:
    """Overall accuracy, macro-F1, Cohen's kappa, per-class F1 and the confusion matrix."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

    labels = list(classes)
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "overall_accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=labels)),
        "per_class_f1": {str(c): float(f) for c, f in zip(labels, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_test_pixels": int(len(y_true)),
    }
