"""Why a pixel got its class: integrated gradients over the (date, variable) inputs.

Attribution target: the logit of the explained class (the predicted one by default). Baseline:
every band (S2 reflectances, VV, VH) at its training mean — 0 in the network's normalised input
space — with the pixel's own information ages and day-of-year channels, so the straight path
from baseline to input changes only measured values: the modality mask (a step function of the
ages) stays fixed along it, the logit is smooth, and completeness holds (Σ attributions =
f(x) − f(baseline) up to the Riemann error of `steps` midpoint steps). Ages and dates get no
attribution by construction: the explanation speaks of variables and of when they mattered.

Summaries use magnitudes |a|: a variable's importance is Σ over dates of |a|, a time window's
(calendar months of the run's period) is Σ over variables and the dates inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NODATA = 255


def method_text(steps: int) -> str:
    """What `pivotmap:method` says about an explanation product."""
    return (
        f"integrated-gradients, {steps} steps (midpoint rule), target=logit of the predicted "
        "class, baseline=training mean of each band (0 in normalised space) with the pixel's own "
        "information ages and day of year"
    )


def variable_channels(spec) -> tuple[list[int], list[str]]:
    """Input channel indices and names of the measured variables (bands, not ages or time)."""
    pairs = [(i, c) for i, c in enumerate(spec.channels[:-2]) if not c.startswith("age_")]
    return [i for i, _ in pairs], [c for _, c in pairs]


def baseline_like(x: torch.Tensor, spec) -> torch.Tensor:
    """The IG baseline of `x`: bands at their training mean (0), ages and day of year kept."""
    index, _ = variable_channels(spec)
    base = x.clone()
    base[..., index] = 0.0
    return base


def _target_logit(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return model(x).float().gather(1, target[:, None])[:, 0]


def integrated_gradients(
    model: nn.Module,
    x: np.ndarray,
    target: np.ndarray | None = None,
    *,
    steps: int = 32,
    batch_size: int = 2048,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attributions [N, T, C] of the target class logit, the targets [N] (predicted when None),
    and the completeness gap [N] = Σ attributions − (f(x) − f(baseline))."""
    model.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        tt = model(xt).argmax(1) if target is None else torch.as_tensor(target, dtype=torch.long)
    base = baseline_like(xt, model.spec)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    per_batch = max(1, batch_size // steps)
    attr = torch.zeros_like(xt)
    gap = torch.zeros(len(xt))
    for s in range(0, len(xt), per_batch):
        xb, bb, tb = xt[s : s + per_batch], base[s : s + per_batch], tt[s : s + per_batch]
        n = len(xb)
        path = (bb[None] + alphas[:, None, None, None] * (xb - bb)[None]).reshape(-1, *xb.shape[1:])
        path.requires_grad_(True)
        logit = _target_logit(model, path, tb.repeat(steps))
        (grad,) = torch.autograd.grad(logit.sum(), path)
        attr[s : s + n] = (xb - bb) * grad.reshape(steps, n, *xb.shape[1:]).mean(0)
        with torch.no_grad():
            delta = _target_logit(model, xb, tb) - _target_logit(model, bb, tb)
        gap[s : s + n] = attr[s : s + n].sum((1, 2)) - delta
    return attr.numpy(), tt.numpy(), gap.numpy()


@dataclass(frozen=True)
class Windows:
    """Time windows (calendar months) of the network's time steps."""

    index: np.ndarray  # [T] window of each step
    labels: tuple[str, ...]  # "YYYY-MM" of each window

    @classmethod
    def monthly(cls, dates: Sequence) -> Windows:
        months = np.asarray(dates, dtype="datetime64[M]")
        labels, index = np.unique(months, return_inverse=True)
        return cls(index=index.astype(np.int64), labels=tuple(str(m) for m in labels))


def importance(attr: np.ndarray, spec, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: |attribution| per variable [N, V] and per time window [N, W]."""
    index, _ = variable_channels(spec)
    mag = np.abs(attr[..., index])  # [N, T, V]
    per_var = mag.sum(1)
    per_win = np.zeros((len(attr), len(windows.labels)), dtype=np.float32)
    np.add.at(per_win.T, windows.index, mag.sum(2).T)
    return per_var, per_win


def heatmap(attr: np.ndarray, spec, windows: Windows) -> np.ndarray:
    """Σ over pixels of |attribution| per variable and window [V, W]."""
    index, _ = variable_channels(spec)
    mag = np.abs(attr[..., index]).sum(0)  # [T, V]
    out = np.zeros((len(index), len(windows.labels)), dtype=np.float64)
    np.add.at(out.T, windows.index, mag)
    return out


def dominant_layers(attr: np.ndarray, spec, windows: Windows) -> tuple[np.ndarray, np.ndarray]:
    """Dominant variable index and dominant window index per pixel (uint8)."""
    per_var, per_win = importance(attr, spec, windows)
    return per_var.argmax(1).astype(np.uint8), per_win.argmax(1).astype(np.uint8)


def heatmap_png(
    maps: dict[str, np.ndarray], variables: Sequence[str], windows: Windows, path, title: str
):
    """One panel per class: variables × months, each panel scaled to its own maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(maps))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.ravel(), maps.items(), strict=False):
        shown = values / values.max() if values.max() > 0 else values
        ax.imshow(shown, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(len(variables)), variables, fontsize=6)
        step = max(1, len(windows.labels) // 6)
        ticks = list(range(0, len(windows.labels), step))
        ax.set_xticks(ticks, [windows.labels[i] for i in ticks], fontsize=6, rotation=45)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
