"""Supervised training, batched inference and the torch device and thread settings they run under.

One optimisation loop (`optimise`) serves supervised training, masked-reconstruction
pretraining (`pretrain.py`) and distillation (`distill.py`): AdamW, one-cycle schedule, seeded
batches, bf16 autocast on CUDA and plain float32 on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from pivotmap.models.network import ModelSpec, build_model


class Batches(Protocol):
    """Inputs [N, T, C] read by rows: an array, or built per batch (`datamodule.Inputs`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any, /) -> np.ndarray: ...


def pick_device(prefer: str | None = None) -> str:
    """CUDA when present (or asked for and present), else CPU."""
    if prefer == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def fastest_threads(spec: ModelSpec, x: Batches, batch_size: int, repeats: int = 3) -> int:
    """The torch thread count that trains `spec` fastest here, timed on a few training steps of
    real inputs: one thread or all of torch's. Small per-pixel networks often run faster on
    one thread (on a shared 2-core machine about 10× on the Flanders patch); wide ones and big
    machines gain from more."""
    import time

    default = torch.get_num_threads()
    if default <= 1 or len(x) < 2:
        return 1
    torch.manual_seed(0)
    model = build_model(spec)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xb = torch.from_numpy(np.ascontiguousarray(x[:batch_size]))
    timings: dict[int, float] = {}
    with cpu_threads("cpu", 1):  # restores torch's own count after
        for threads in (1, default):
            torch.set_num_threads(threads)
            best = float("inf")
            for i in range(repeats + 1):  # the first step warms up
                started = time.perf_counter()
                optimiser.zero_grad()
                model(xb).float().logsumexp(-1).mean().backward()
                optimiser.step()
                elapsed = time.perf_counter() - started
                if i:
                    best = min(best, elapsed)
                if timings and elapsed > 3 * min(timings.values()):
                    break  # clearly slower: no need to time it further
            timings[threads] = best
    return min(timings, key=lambda t: timings[t])


def autocast(device: str):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda")


@dataclass(frozen=True)
class FitResult:
    model: nn.Module
    losses: list[float]


def optimise(
    model: nn.Module,
    n_samples: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
    lr_scale: Callable[[str], float] | None = None,
    label: str = "train",
) -> list[float]:
    """Minimise `batch_loss(indices)` over seeded shuffled batches; mean loss per epoch.
    `lr_scale(name)` scales the learning rate of a parameter (e.g. pretrained weights).
    Each epoch advances a progress bar (and Prefect progress artifact) named `label` and logs
    its loss."""
    from pivotmap.progress import track
    from pivotmap.runtime import run_logger

    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        groups.setdefault(lr_scale(name) if lr_scale else 1.0, []).append(param)
    rates = [learning_rate * scale for scale in groups]
    optimiser = torch.optim.AdamW(
        [{"params": p, "lr": r} for p, r in zip(groups.values(), rates, strict=True)],
        weight_decay=1e-4,
    )
    steps = epochs * max(1, -(-n_samples // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, rates, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    log = run_logger(label)
    for epoch in track(range(epochs), f"{label} epochs", total=epochs):
        order, total = torch.randperm(n_samples, generator=generator), 0.0
        for start in range(0, n_samples, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm (older architecture) needs two samples
                continue
            optimiser.zero_grad()
            with autocast(device):
                loss = batch_loss(idx)
            loss.float().backward()
            optimiser.step()
            scheduler.step()
            total += loss.item() * len(idx)
        losses.append(total / max(1, n_samples))
        log.info("%s epoch %d/%d: loss %.4f", label, epoch + 1, epochs, losses[-1])
    model.eval()
    return losses


def take(x: Batches, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of inputs held as an array or built per batch (`datamodule.Inputs`)."""
    return torch.from_numpy(np.ascontiguousarray(x[idx.numpy()]))


def class_weights(y_idx: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes): rare classes count as much."""
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float32)
    return torch.tensor(counts.sum() / np.maximum(counts, 1) / n_classes)


def fit(
    x: Batches,
    y_idx: np.ndarray,
    spec: ModelSpec,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
    init_state: dict[str, torch.Tensor] | None = None,
    init_lr_scale: float = 1.0,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> FitResult:
    """Train a network on [N, T, C] inputs and class indices with a class-balanced loss;
    `init_state` (e.g. a pretrained encoder) initialises the matching weights, which then
    learn at `init_lr_scale` times the learning rate. `augment(batch, rng)` transforms each
    training batch (e.g. `datamodule.Augment`), seeded by `seed`."""
    torch.manual_seed(seed)
    model = build_model(spec)
    if init_state:
        missing = model.load_state_dict(init_state, strict=False).missing_keys
        if len(missing) == len(model.state_dict()):
            raise ValueError("init_state shares no weight with the network of `spec`")
    model = model.to(device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y_idx, len(spec.classes)).to(device))
    yt = torch.from_numpy(y_idx.astype(np.int64))

    rng = np.random.default_rng([seed, 15])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        if augment is None:
            xb = take(x, idx)
        else:
            xb = torch.from_numpy(np.ascontiguousarray(augment(x[idx.numpy()], rng)))
        return loss_fn(model(xb.to(device)).float(), yt[idx].to(device))

    losses = optimise(
        model,
        len(yt),
        batch_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        lr_scale=(lambda name: init_lr_scale if name in init_state else 1.0)
        if init_state
        else None,
    )
    return FitResult(model=model, losses=losses)


def device_batches(x: Batches, batch_size: int, device: str = "cpu") -> Iterator[torch.Tensor]:
    """Rows of x, `batch_size` at a time, as contiguous tensors on `device`."""
    for start in range(0, len(x), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)


@torch.no_grad()
def predict_proba(model: nn.Module, x: Batches, batch_size: int, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities [N, K], batched; bf16 autocast on CUDA."""
    model.eval()
    out = []
    for xb in device_batches(x, batch_size, device):
        with autocast(device):
            logits = model(xb)
        out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    if not out:
        return np.zeros((0, len(cast(ModelSpec, model.spec).classes)), dtype=np.float32)
    return np.concatenate(out)


@torch.no_grad()
def predict_vote(
    model: nn.Module, x: Batches, batch_size: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities [N, K] and, for an ensemble (`network.EnsembleClassifier`), the
    members' agreement [N] (None for one network); batched, bf16 autocast on CUDA."""
    vote = getattr(model, "vote", None)
    if vote is None:
        return predict_proba(model, x, batch_size, device), None
    model.eval()
    probas, agreements = [], []
    for xb in device_batches(x, batch_size, device):
        with autocast(device):
            proba, agreement = vote(xb)
        probas.append(proba.float().cpu().numpy())
        agreements.append(agreement.float().cpu().numpy())
    if not probas:
        n_classes = len(cast(ModelSpec, model.spec).classes)
        return np.zeros((0, n_classes), dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(probas), np.concatenate(agreements)


def confidence_percent(proba: np.ndarray, agreement: np.ndarray | None) -> np.ndarray:
    """Confidence 0–100 (uint8) of each pixel's class: its probability, times the members'
    agreement for an ensemble (a class half the members reject counts half)."""
    top = proba.max(1)
    if agreement is not None:
        top = top * agreement
    return np.rint(top * 100).astype(np.uint8)
