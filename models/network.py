"""The pixel time-series classifier: one temporal encoder per modality, gated fusion, a head.

Input per pixel is the pivot cube sampled every `step_days` days: a tensor [N, T, C] whose
channels are listed in `ModelSpec.channels` (S2 bands + age_s2, VV/VH + age_s1, then sin/cos of
the day of year). Missing values arrive as 0 with their age channel set to the cap, so the
network knows what was observed and what was filled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network and feed it: saved next to the weights."""

    classes: tuple[int, ...]
    s2_channels: tuple[str, ...] = (*S2_BANDS, "age_s2")
    s1_channels: tuple[str, ...] = (*S1_BANDS, "age_s1")
    step_days: int = 5
    n_steps: int = 73
    hidden: int = 64
    norm_mean: dict[str, float] = field(default_factory=dict)
    norm_std: dict[str, float] = field(default_factory=dict)
    age_cap: float = 60.0

    @property
    def channels(self) -> tuple[str, ...]:
        return (*self.s2_channels, *self.s1_channels, "doy_sin", "doy_cos")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        raw = dict(raw)
        for key in ("classes", "s2_channels", "s1_channels"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


class TemporalEncoder(nn.Module):
    """Temporal convolutions then attention pooling over time: [N, T, C] -> [N, H]."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(in_channels, hidden, kernel_size=5, padding=2),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, kernel_size=5, padding=2),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
        )
        self.score = nn.Conv1d(hidden, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2))  # [N, H, T]
        weights = torch.softmax(self.score(h), dim=-1)
        return (h * weights).sum(dim=-1)


class FusionClassifier(nn.Module):
    """S2 and S1 encoders fused by a learned gate, so one modality alone still classifies."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        n2, n1 = len(spec.s2_channels), len(spec.s1_channels)
        self.s2_slice = slice(0, n2)
        self.s1_slice = slice(n2, n2 + n1)
        self.time_slice = slice(n2 + n1, n2 + n1 + 2)
        self.s2 = TemporalEncoder(n2 + 2, spec.hidden)
        self.s1 = TemporalEncoder(n1 + 2, spec.hidden)
        self.gate = nn.Sequential(nn.Linear(2 * spec.hidden, 2), nn.Softmax(dim=-1))
        self.head = nn.Sequential(
            nn.Linear(spec.hidden, spec.hidden),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(spec.hidden, len(spec.classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x[..., self.time_slice]
        h2 = self.s2(torch.cat([x[..., self.s2_slice], t], dim=-1))
        h1 = self.s1(torch.cat([x[..., self.s1_slice], t], dim=-1))
        g = self.gate(torch.cat([h2, h1], dim=-1))
        return self.head(g[:, :1] * h2 + g[:, 1:] * h1)


def build_model(spec: ModelSpec | dict) -> FusionClassifier:
    """The network for `spec` (a ModelSpec or its dict form), with fresh weights."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return FusionClassifier(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_pixel(spec: ModelSpec) -> int:
    """Multiply-adds per pixel of one forward pass (convolutions and linear layers)."""
    t, h = spec.n_steps, spec.hidden
    per_encoder = [(len(spec.s2_channels) + 2), (len(spec.s1_channels) + 2)]
    conv = sum(t * (c * h * 5 + h * h * 5 + h) for c in per_encoder)
    head = 2 * h * 2 + h * h + h * len(spec.classes)
    return int(2 * (conv + head))


def doy_features(days_of_year: torch.Tensor) -> torch.Tensor:
    """sin/cos of the day of year: [T] -> [T, 2]."""
    angle = 2 * math.pi * days_of_year.float() / 365.25
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)
