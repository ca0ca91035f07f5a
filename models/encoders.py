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
