"""Distillation: a smaller student learns the teacher's soft predictions, for fast inference."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pivotmap.models.network import ModelSpec, build_model
from pivotmap.models.training import Batches, FitResult, optimise, predict_proba, take


def student_spec(teacher: ModelSpec, hidden: int) -> ModelSpec:
    """The student's architecture: narrower, 4 tokens per modality, no per-modality attention,
    patches of 4 steps (half the teacher's time axis)."""
    return teacher.replace(hidden=hidden, tokens=4, layers=0, fusion_layers=1, heads=2, patch=4)


def distill(
    teacher: torch.nn.Module,
    x: Batches,
    y_idx: np.ndarray,
    spec: ModelSpec,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    temperature: float = 2.0,
    device: str = "cpu",
) -> FitResult:
    """Train a `spec` student on inputs [N, T, C]: KL to the teacher's softened probabilities
    on every pixel, plus cross-entropy where a label is known (`y_idx` >= 0; -1 = unlabelled)."""
    if len(x) != len(y_idx):
        raise ValueError(f"x has {len(x)} pixels but y_idx has {len(y_idx)}")
    proba = predict_proba(teacher, x, 8192, device).astype(np.float64)
    sharpened = proba ** (1 / temperature)
    soft = torch.from_numpy((sharpened / sharpened.sum(1, keepdims=True)).astype(np.float32))
    torch.manual_seed(seed)
    student = build_model(spec).to(device)
    yt = torch.from_numpy(y_idx.astype(np.int64))

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = student(take(x, idx).to(device)).float()
        log_p = F.log_softmax(logits / temperature, dim=-1)
        loss = F.kl_div(log_p, soft[idx].to(device), reduction="batchmean") * temperature**2
        known = yt[idx] >= 0
        if known.any():
            loss = loss + F.cross_entropy(logits[known.to(device)], yt[idx][known].to(device))
        return loss

    losses = optimise(
        student,
        len(x),
        batch_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        label="distil",
    )
    return FitResult(model=student, losses=losses)
