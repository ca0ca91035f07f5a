"""The pixel time-series classifier: one temporal encoder per modality, attention fusion, a head.

Input per pixel is the pivot cube sampled every `step_days` days: a tensor [N, T, C] whose
channels are listed in `ModelSpec.channels` (S2 bands + age_s2, VV/VH + age_s1, then sin/cos of
the day of year). Missing values arrive as 0 with their age channel set to the cap, so the
network knows what was observed and what was filled.

Each modality's encoder (`encoders.ModalityEncoder`) pools its T steps into a few tokens; a
fusion transformer attends across the tokens of both modalities. A modality with no information
in a pixel (every age at the cap) is masked out of the fusion, so one modality alone still
classifies; training drops a modality at random (`modality_dropout`) so that this case is learnt.

With `ModelSpec.members` > 1 the network is an ensemble (`EnsembleClassifier`): that many
networks of the same architecture, trained with other seeds, whose class probabilities are
averaged; the share of members that vote for the ensemble's class is its per-pixel agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn

from pivotmap.models.encoders import Block, ModalityEncoder, SummaryToken

S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")
FUSION = "fusion-attention"
LEGACY = "tempconv"  # the skeleton's network: models registered before the fusion encoders


def classifier_head(hidden: int, n_classes: int) -> nn.Sequential:
    """The MLP that turns a pixel embedding into class logits (keys head.0 / head.3 in weights)."""
    return nn.Sequential(
        nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes)
    )


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
    arch: str = FUSION
    modalities: tuple[str, ...] = ("s2", "s1")
    tokens: int = 8
    layers: int = 1
    fusion_layers: int = 1
    heads: int = 4
    modality_dropout: float = 0.15
    patch: int = 2
    members: int = 1  # > 1: an ensemble of that many networks (`EnsembleClassifier`)
    summary: bool = False  # each modality adds a calendar-free `SummaryToken` to its tokens
    season: tuple[float, ...] = ()  # mean NDVI per step of the training region (`calendar`)

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - {"s2", "s1"}
        if unknown or not self.modalities:
            raise ValueError(f"ModelSpec.modalities must be s2 and/or s1, got {self.modalities}")
        if self.arch not in (FUSION, LEGACY):
            raise ValueError(f"ModelSpec.arch {self.arch!r} is not {FUSION!r} or {LEGACY!r}")
        if self.members < 1:
            raise ValueError(f"ModelSpec.members must be at least 1, got {self.members}")

    @property
    def channels(self) -> tuple[str, ...]:
        return (*self.s2_channels, *self.s1_channels, "doy_sin", "doy_cos")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> ModelSpec:
        """A copy with some fields changed."""
        return ModelSpec(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        raw = dict(raw)
        raw.setdefault("arch", LEGACY)  # specs written before `arch` existed
        for key in ("classes", "s2_channels", "s1_channels", "modalities", "season"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


class FusionClassifier(nn.Module):
    """Per-modality encoders -> tokens -> fusion transformer across modalities -> head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        n2, n1 = len(spec.s2_channels), len(spec.s1_channels)
        self.slices = {"s2": slice(0, n2), "s1": slice(n2, n2 + n1)}
        self.time_slice = slice(n2 + n1, n2 + n1 + 2)
        self.age_index = {
            m: [i for i, c in enumerate(spec.channels[self.slices[m]]) if c.startswith("age_")]
            for m in spec.modalities
        }
        widths = {"s2": n2, "s1": n1}
        self.encoders = nn.ModuleDict(
            {
                m: ModalityEncoder(
                    widths[m] + 2, spec.hidden, spec.tokens, spec.layers, spec.heads, spec.patch
                )
                for m in spec.modalities
            }
        )
        names = {"s2": spec.s2_channels, "s1": spec.s1_channels}
        self.summaries = nn.ModuleDict(
            {
                m: SummaryToken(names[m], spec.norm_mean, spec.norm_std, spec.hidden)
                for m in (spec.modalities if spec.summary else ())
            }
        )
        self.modality_embed = nn.Parameter(torch.zeros(len(spec.modalities), 1, spec.hidden))
        self.fusion = nn.ModuleList(
            Block(spec.hidden, spec.heads) for _ in range(spec.fusion_layers)
        )
        self.norm = nn.LayerNorm(spec.hidden)
        self.head = classifier_head(spec.hidden, len(spec.classes))

    def present(self, x: torch.Tensor) -> torch.Tensor:
        """[N, M] True where a modality holds information (some age below the cap)."""
        cols = []
        for m in self.spec.modalities:
            ages = x[..., self.slices[m]][..., self.age_index[m]]
            cols.append(
                (ages < 1).flatten(1).any(1) if ages.shape[-1] else x.new_ones(len(x)).bool()
            )
        return torch.stack(cols, dim=1)

    def _drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Training only: hide one random modality from a share of the pixels."""
        n, m = present.shape
        if not self.training or m < 2 or self.spec.modality_dropout <= 0:
            return present
        drop = torch.rand(n, device=present.device) < self.spec.modality_dropout
        which = torch.randint(0, m, (n,), device=present.device)
        hidden = torch.nn.functional.one_hot(which, m).bool() & drop[:, None]
        return present & ~hidden

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused tokens [N, M*Q, D] and their mask [N, M*Q] (True = the modality is used)."""
        t = x[..., self.time_slice]
        tokens = []
        for i, m in enumerate(self.spec.modalities):
            own = self.encoders[m](torch.cat([x[..., self.slices[m]], t], dim=-1))
            if self.spec.summary:
                own = torch.cat([own, self.summaries[m](x[..., self.slices[m]])], dim=1)
            tokens.append(own + self.modality_embed[i])
        present = self._drop_modalities(self.present(x))
        present = present | ~present.any(1, keepdim=True)  # nothing known: use every modality
        per_modality = self.spec.tokens + (1 if self.spec.summary else 0)
        mask = present.repeat_interleave(per_modality, dim=1)
        h = torch.cat(tokens, dim=1)
        for block in self.fusion:
            h = block(h, mask)
        return h, mask

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One pixel embedding [N, D]: the mean of the used tokens."""
        h, mask = self.encode(x)
        weights = mask.to(h.dtype).unsqueeze(-1)
        return self.norm((h * weights).sum(1) / weights.sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class TemporalConvEncoder(nn.Module):
    """The skeleton's encoder (kept to load older registered models): [N, T, C] -> [N, H]."""

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
        h = self.conv(x.transpose(1, 2))
        return (h * torch.softmax(self.score(h), dim=-1)).sum(dim=-1)


class TempConvClassifier(nn.Module):
    """The skeleton's gated S2/S1 classifier (`arch: tempconv`), for registered older models."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        n2, n1 = len(spec.s2_channels), len(spec.s1_channels)
        self.s2_slice, self.s1_slice = slice(0, n2), slice(n2, n2 + n1)
        self.time_slice = slice(n2 + n1, n2 + n1 + 2)
        self.s2 = TemporalConvEncoder(n2 + 2, spec.hidden)
        self.s1 = TemporalConvEncoder(n1 + 2, spec.hidden)
        self.gate = nn.Sequential(nn.Linear(2 * spec.hidden, 2), nn.Softmax(dim=-1))
        self.head = classifier_head(spec.hidden, len(spec.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x[..., self.time_slice]
        h2 = self.s2(torch.cat([x[..., self.s2_slice], t], dim=-1))
        h1 = self.s1(torch.cat([x[..., self.s1_slice], t], dim=-1))
        g = self.gate(torch.cat([h2, h1], dim=-1))
        return self.head(g[:, :1] * h2 + g[:, 1:] * h1)


class EnsembleClassifier(nn.Module):
    """`spec.members` networks of one architecture that vote: the forward pass gives the log of
    their mean class probabilities (its softmax is that mean; argmax, cross-entropy and
    gradients work as on one network's logits). The members' probabilities are summed one
    member at a time, never stacked: memory stays about that of one member's batch."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        member = spec.replace(members=1)
        self.members = nn.ModuleList(build_model(member) for _ in range(spec.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None  # log of the sum of the members' probabilities
        for member in self.members:
            log_p = torch.log_softmax(member(x).float(), dim=-1)
            total = log_p if total is None else torch.logaddexp(total, log_p)
        assert total is not None  # members >= 1
        return total - math.log(len(self.members))

    def vote(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean class probabilities [N, K] and the agreement [N]: the share of members
        whose own class is the ensemble's."""
        total: torch.Tensor | None = None
        votes = []
        for member in self.members:
            p = torch.softmax(member(x).float(), dim=-1)
            total = p if total is None else total + p
            votes.append(p.argmax(-1))
        assert total is not None
        proba = total / len(self.members)
        agreement = torch.stack(votes).eq(proba.argmax(-1)).float().mean(0)
        return proba, agreement

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's pixel embedding (the text-alignment head's input): the members'
        embedding spaces differ, so they are not averaged."""
        return cast(FusionClassifier, self.members[0]).embed(x)


class Voting(nn.Module):
    """An ensemble whose forward pass gives (mean probabilities, agreement): what its
    registered `torch.export` program computes, so that the MLflow pyfunc's confidence is
    pivotmap's."""

    def __init__(self, ensemble: EnsembleClassifier) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ensemble.vote(x)


def exportable(model: nn.Module) -> nn.Module:
    """What `torch.export` saves of `model`: an ensemble votes (`Voting`), a network is itself."""
    return Voting(model) if isinstance(model, EnsembleClassifier) else model


def ensemble_of(models: list[nn.Module]) -> nn.Module:
    """One model of networks trained on one spec: the network itself when there is one, else
    an `EnsembleClassifier` of them (the same modules, not copies), in eval mode."""
    spec = cast(ModelSpec, models[0].spec)
    if any(m.spec != spec for m in models):
        raise ValueError("an ensemble's members must share one ModelSpec")
    if len(models) == 1:
        return models[0]
    ensemble = EnsembleClassifier(spec.replace(members=len(models)))
    ensemble.members = nn.ModuleList(models)
    return ensemble.eval()


def build_model(spec: ModelSpec | dict) -> nn.Module:
    """The network for `spec` (a ModelSpec or its dict form), with fresh weights: an ensemble
    (`EnsembleClassifier`) when `spec.members` > 1."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    if spec.members > 1:
        return EnsembleClassifier(spec)
    return TempConvClassifier(spec) if spec.arch == LEGACY else FusionClassifier(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_pixel(spec: ModelSpec, n_steps: int | None = None) -> int:
    """FLOPs of one pixel's forward pass (2 per multiply-add of matmuls, convolutions and
    attention, as counted by torch's FlopCounterMode; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(spec).eval()
    x = torch.zeros(1, n_steps or spec.n_steps, len(spec.channels))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
