"""Self-supervised pretraining: reconstruct masked spans of real observations from the rest.

Random spans of each modality's series are hidden the way the network sees a gap (bands 0,
information age at the cap); a light decoder queries the fused tokens with the day of year of
every step and must give back the band values, scored only where a real observation was
hidden (age 0), never on values that gap filling made up. Needs no labels, so it runs on every
pixel of the cube outside the held-out blocks; the encoders then initialise the classifier.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pivotmap.models.encoders import Attention
from pivotmap.models.network import FusionClassifier, ModelSpec
from pivotmap.models.training import Batches, optimise, take


class MaskedReconstruction(nn.Module):
    """A `FusionClassifier` backbone plus a per-step decoder of the bands (not the ages)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = FusionClassifier(spec)
        self.targets = _band_channels(spec)
        d = spec.hidden
        self.query = nn.Linear(2, d)
        self.cross = Attention(d, spec.heads)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(self.targets)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, C] masked input -> [N, T, len(targets)] reconstructed bands."""
        tokens, mask = self.backbone.encode(x)
        q = self.query(x[..., self.backbone.time_slice])
        return self.out(self.norm(q + self.cross(q, tokens, mask)))

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The backbone's weights without its (untrained) classification head."""
        state = self.backbone.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith("head.")}


def _band_channels(spec: ModelSpec) -> list[int]:
    """Indices of the band channels (not ages) of the modalities the spec uses."""
    n2 = len(spec.s2_channels)
    offsets = {"s2": (0, spec.s2_channels), "s1": (n2, spec.s1_channels)}
    return [
        start + i
        for m in spec.modalities
        for start, names in [offsets[m]]
        for i, name in enumerate(names)
        if not name.startswith("age_")
    ]


def mask_spans(
    x: torch.Tensor, spec: ModelSpec, ratio: float, span: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide spans of `span` steps (each with probability `ratio`) per pixel and modality.

    Returns the masked input and a [N, T, C] boolean of the band values to score: hidden and
    really observed (age 0 at that step)."""
    n, t, _ = x.shape
    masked, score = x.clone(), torch.zeros_like(x, dtype=torch.bool)
    n2 = len(spec.s2_channels)
    for m, start, names in (("s2", 0, spec.s2_channels), ("s1", n2, spec.s1_channels)):
        if m not in spec.modalities:
            continue
        segments = torch.rand(n, math.ceil(t / span), generator=generator) < ratio
        hide = segments.repeat_interleave(span, dim=1)[:, :t].to(x.device)
        ages = [start + i for i, c in enumerate(names) if c.startswith("age_")]
        observed = (x[..., ages] == 0).all(-1) if ages else torch.ones_like(hide)
        for i, name in enumerate(names):
            c = start + i
            masked[..., c] = torch.where(hide, 1.0 if name.startswith("age_") else 0.0, x[..., c])
            if not name.startswith("age_"):
                score[..., c] = hide & observed
    return masked, score


def pretrain(
    x: Batches,
    spec: ModelSpec,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str = "cpu",
    ratio: float = 0.4,
    span: int = 4,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Masked-reconstruction pretraining on unlabelled inputs [N, T, C].

    Returns the encoder weights (for `training.fit(init_state=...)`) and the loss per epoch."""
    if len(x) < 2:
        raise ValueError(f"pretraining needs at least 2 unlabelled pixels, got {len(x)}")
    torch.manual_seed(seed)
    model = MaskedReconstruction(spec).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    targets = torch.tensor(model.targets)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = take(x, idx)
        masked, score = mask_spans(xb, spec, ratio, span, generator)
        pred = model(masked.to(device)).float()
        score = score[..., targets].to(device)
        err = (pred - xb[..., targets].to(device)) ** 2
        return (err * score).sum() / score.sum().clamp(min=1)

    losses = optimise(
        model,
        len(x),
        batch_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        label="pretrain",
    )
    return model.encoder_state(), losses
