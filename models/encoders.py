"""Building blocks of the pixel encoders: per-step embedding, learned temporal pooling, attention.

The daily pivot, sampled every `step_days`, gives T steps per pixel (about 100 for a year and a
half). Steps are grouped in patches (T/2 by default) and only a small per-patch MLP sees them;
learned pooling then reduces the time axis to a few tokens and the attention layers work on
those tokens, so the cost per pixel grows with T only through the cheap per-patch layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention on [N, L, D] tokens (scaled_dot_product_attention, counted by FLOP
    counters), with an optional boolean key mask [N, L] (True = attend)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = math.gcd(dim, heads)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, lq, d = query.shape
        q = self.q(query).view(n, lq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, self.heads, -1).unbind(2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        h = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.out(h.transpose(1, 2).reshape(n, lq, d))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention then a 2x MLP, both residual."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, key_mask)
        return x + self.mlp(self.norm2(x))


class LearnedPooling(nn.Module):
    """Reduce the time axis: Q learned soft selections of the T steps, [N, T, D] -> [N, Q, D]."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, tokens)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(h), dim=1)  # [N, T, Q], each query sums to 1 over T
        return torch.einsum("ntq,ntd->nqd", weights, h)


class ModalityEncoder(nn.Module):
    """One modality's series (bands, information age, day of year) -> Q tokens [N, Q, D].

    Consecutive steps are first grouped into patches of `patch` steps (their values
    concatenated), which halves the time axis and gives the embedding local temporal context
    for the cost of a reshape."""

    def __init__(
        self, in_channels: int, dim: int, tokens: int, layers: int, heads: int, patch: int = 2
    ) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Sequential(
            nn.Linear(in_channels * patch, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.pool = LearnedPooling(dim, tokens)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        pad = -t % self.patch
        if pad:  # repeat the last step so that T divides into patches
            x = torch.cat([x, x[:, -1:].expand(n, pad, c)], dim=1)
        tokens = self.pool(self.embed(x.reshape(n, -1, c * self.patch)))
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


SUMMARY_PERCENTILES = (10, 25, 50, 75, 90)
SUMMARY_MIN_CLEAR = 3  # fewer clear steps than this: every step with something known stands in
# spectral indices of the summary token (the baseline's `INDICES`), then S1's cross-ratio
SUMMARY_INDICES = (("B08", "B04"), ("B03", "B08"), ("B11", "B08"))


class SummaryToken(nn.Module):
    """A calendar-free token of one modality: per band, per index (NDVI, NDWI, NDBI; S1's
    VH − VV), the 10/25/50/75/90th percentiles, mean and std of the clear steps (age 0) of
    the pixel's series, through a small MLP, [N, T, C] -> [N, 1, D].

    These are the features of the percentile baseline (`baseline.percentile_features`), which
    transfers best to another place and year because they do not say *when* a value was seen;
    as a token they join the encoder's date-aware tokens in the fusion. The bands arrive
    normalised; `mean` and `std` (the spec's normalisation) give back their values for the
    indices. Sorting and gathering keep it a `torch.export` program."""

    band_mean: torch.Tensor
    band_std: torch.Tensor

    def __init__(
        self, names: tuple[str, ...], mean: dict[str, float], std: dict[str, float], dim: int
    ) -> None:
        super().__init__()
        bands = [i for i, n in enumerate(names) if not n.startswith("age_")]
        self.bands = bands
        self.age = next((i for i, n in enumerate(names) if n.startswith("age_")), None)
        where = {n: k for k, n in enumerate(names[i] for i in bands)}  # position among bands
        pairs = [(where[a], where[b]) for a, b in SUMMARY_INDICES if a in where and b in where]
        self.ratios = [(where["VH"], where["VV"])] if {"VH", "VV"} <= where.keys() else []
        self.pairs = pairs
        band_names = [names[i] for i in bands]
        self.register_buffer(
            "band_mean", torch.tensor([mean.get(n, 0.0) for n in band_names]), persistent=False
        )
        self.register_buffer(
            "band_std", torch.tensor([std.get(n, 1.0) for n in band_names]), persistent=False
        )
        width = (len(bands) + len(pairs) + len(self.ratios)) * (len(SUMMARY_PERCENTILES) + 2)
        self.mlp = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x[..., self.bands]
        curves = [values]
        if self.pairs or self.ratios:
            raw = values * self.band_std + self.band_mean
            for a, b in self.pairs:
                total = raw[..., a] + raw[..., b]
                safe = torch.where(total.abs() > 1e-6, total, torch.ones_like(total))
                curves.append(((raw[..., a] - raw[..., b]) / safe).unsqueeze(-1))
            for a, b in self.ratios:  # dB: the cross-polarisation ratio, ~ -15 .. 0
                curves.append(((raw[..., a] - raw[..., b]) / 10).unsqueeze(-1))
        curve = torch.cat(curves, dim=-1)  # [N, T, F]
        if self.age is None:
            clear = torch.ones_like(curve[..., 0], dtype=torch.bool)
        else:
            age = x[..., self.age]
            clear = age == 0
            few = clear.sum(1, keepdim=True) < SUMMARY_MIN_CLEAR
            clear = torch.where(few, age < 1, clear)  # too few clear steps: what is known
        keep = clear.unsqueeze(-1).expand_as(curve)
        n = keep.sum(1, keepdim=True)  # [N, 1, F]
        ordered = torch.sort(torch.where(keep, curve, torch.full_like(curve, math.inf)), 1)[0]
        ordered = torch.where(torch.isfinite(ordered), ordered, torch.zeros_like(ordered))
        last = (n - 1).clamp(min=0)
        parts = []
        for q in SUMMARY_PERCENTILES:
            position = last.to(curve.dtype) * (q / 100)
            low = position.floor()
            high = torch.minimum(low + 1, last.to(curve.dtype))
            frac = position - low
            at = ordered.gather(1, low.long()) * (1 - frac) + ordered.gather(1, high.long()) * frac
            parts.append(at)
        count = n.clamp(min=1).to(curve.dtype)
        zeroed = torch.where(keep, curve, torch.zeros_like(curve))
        mean = zeroed.sum(1, keepdim=True) / count
        spread = torch.where(keep, curve - mean, torch.zeros_like(curve))
        parts += [mean, (spread.square().sum(1, keepdim=True) / count).sqrt()]
        stats = torch.cat(parts, dim=-1)  # [N, 1, F * 7]
        stats = torch.where(n.repeat(1, 1, len(parts)) > 0, stats, torch.zeros_like(stats))
        return self.mlp(stats)
