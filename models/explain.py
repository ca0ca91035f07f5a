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

`explain` runs this over a run folder: an explanation layer per tile (dominant variable and month
on every `stride`-th pixel), a variables × months plot per class and the full saliency of the
configured pixels.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from odc.geo.geobox import GeoBox
from torch import nn

from pivotmap.models.calendar import unshift
from pivotmap.models.concept import TileSpan
from pivotmap.models.features import window_inputs
from pivotmap.models.inference import load_for_worker, predict_shift_steps
from pivotmap.models.network import ModelSpec
from pivotmap.models.training import cpu_threads
from pivotmap.results import ExplainResult, ModelRef, PredictResult
from pivotmap.tasks.concept_products import explanation_layer, save_layer_cog
from pivotmap.tasks.cube import PivotReader
from pivotmap.tasks.grid import Tile
from pivotmap.tasks.nomenclature import load_nomenclature
from pivotmap.tasks.workspace import Workspace

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
    def monthly(cls, dates: Sequence | np.ndarray) -> Windows:
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
    maps: dict[str, np.ndarray], variables: Sequence[str], windows: Windows, title: str
) -> bytes:
    """One panel per class: variables × months, each panel scaled to its own maximum (PNG)."""
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return png.getvalue()


# --- explanations of a run ------------------------------------------------------------------


@dataclass
class ClassAttribution:
    """Per class code: Σ |attribution| [V, W] and pixels explained; the completeness gaps."""

    heat: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    gaps: list[np.ndarray] = field(default_factory=list)

    def add(self, code: int, heat: np.ndarray, count: int) -> None:
        self.heat[code] = self.heat.get(code, 0) + heat
        self.counts[code] = self.counts.get(code, 0) + count

    def merge(self, other: ClassAttribution) -> None:
        for code, heat in other.heat.items():
            self.add(code, heat, other.counts[code])
        self.gaps.extend(other.gaps)


def _grid_pixels(h: int, w: int, r: int, c: int, wh: int, ww: int, stride: int) -> np.ndarray:
    """Flat indices inside a window of the tile pixels on the explanation grid."""
    off = stride // 2
    rows = [i for i in range(wh) if (r + i) % stride == min(off, h - 1) % stride]
    cols = [j for j in range(ww) if (c + j) % stride == min(off, w - 1) % stride]
    return (np.asarray(rows)[:, None] * ww + np.asarray(cols)[None, :]).ravel()


@dataclass(frozen=True)
class Explainer:
    """Integrated gradients of one network over the pivot cube, summarised by month."""

    model: nn.Module
    spec: ModelSpec
    reader: PivotReader
    windows: Windows
    steps: int
    shift_steps: int = 0  # the calendar shift predict classified with (`models.calendar`)

    def attributions(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`integrated_gradients` of the network on x as predict fed it (moved by the
        calendar shift), the attributions put back on the region's own dates."""
        attr, target, gap = integrated_gradients(self.model, x, steps=self.steps)
        attr[..., :-2] = unshift(attr[..., :-2], self.shift_steps)  # time channels stay
        return attr, target, gap

    def tile(self, span: TileSpan, window: int, stride: int) -> tuple[np.ndarray, ClassAttribution]:
        """Explanation layer [2, ny, nx] of one tile on every `stride`-th pixel, and its sums."""
        h, w = span.shape
        layer = np.full((2, -(-h // stride), -(-w // stride)), NODATA, dtype=np.uint8)
        found = ClassAttribution()
        for rows, cols in span.windows(window):
            ds = self.reader.window(*span.absolute(rows, cols), step_days=self.spec.step_days)
            x, ok = window_inputs(ds, self.spec, self.shift_steps)
            ww = ds.sizes["x"]
            picks = _grid_pixels(h, w, rows.start, cols.start, ds.sizes["y"], ww, stride)
            keep = picks[ok[picks]]
            if not keep.size:
                continue
            rank = np.cumsum(ok) - 1  # flat window index -> row of x
            attr, target, gap = self.attributions(x[rank[keep]])
            ly, lx = (rows.start + keep // ww) // stride, (cols.start + keep % ww) // stride
            layer[0, ly, lx], layer[1, ly, lx] = dominant_layers(attr, self.spec, self.windows)
            found.gaps.append(gap)
            for k in np.unique(target):
                heat = heatmap(attr[target == k], self.spec, self.windows)
                found.add(int(self.spec.classes[k]), heat, int((target == k).sum()))
        return layer, found

    def pixel(self, extent: GeoBox, x0: float, y0: float) -> dict:
        """Full date × variable attributions of the pixel at (x0, y0), or why there are none."""
        col, row = (int(np.floor(v)) for v in ~extent.affine * (x0, y0))
        entry = {"x": x0, "y": y0, "row": row, "col": col}
        if not (0 <= row < extent.height and 0 <= col < extent.width):
            return entry | {"error": "outside the mapped region"}
        ds = self.reader.window(slice(row, row + 1), slice(col, col + 1), self.spec.step_days)
        x, ok = window_inputs(ds, self.spec, self.shift_steps)
        if not ok.any():
            return entry | {"error": "no data in the cube at this pixel"}
        attr, target, gap = self.attributions(x)
        per_var, per_win = importance(attr, self.spec, self.windows)
        index, names = variable_channels(self.spec)
        return entry | {
            "class": int(self.spec.classes[target[0]]), "completeness_gap": round(float(gap[0]), 5),
            "dates": [str(d)[:10] for d in ds.time.values], "variables": names,
            "attributions": np.round(attr[0][:, index], 5).tolist(),
            "dominant_variable": names[int(per_var[0].argmax())],
            "dominant_window": self.windows.labels[int(per_win[0].argmax())],
        }  # fmt: skip


def explain(ws: Workspace) -> ExplainResult:
    """Explanation layers per tile (explain/), the per-class plot and the saliency of the
    configured pixels (reports/), for the model version predict used."""
    started, ec = time.monotonic(), ws.config.explain
    ref = ws.read_result(PredictResult).model
    model, spec = load_for_worker(ws.model_url(ref.name, ref.version), "cpu")
    reader = PivotReader(ws.pivot_url)
    windows = Windows.monthly(reader.times[:: spec.step_days])
    shift = predict_shift_steps(ws, ref, spec)
    explainer = Explainer(model, spec, reader, windows, ec.steps, shift)
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    layers, total = {}, ClassAttribution()
    for tile in tiles:
        span = TileSpan.of(tile, extent)
        with cpu_threads("cpu", ws.config.train.cpu_threads):
            layer, found = explainer.tile(span, ws.config.predict.window, ec.stride)
        layers[tile.id] = [_save_explanation_layer(ws, explainer, tile, layer, ref)]
        total.merge(found)
    with cpu_threads("cpu", ws.config.train.cpu_threads):
        pixels = [explainer.pixel(extent, x0, y0) for x0, y0 in ec.pixels]
    method = method_text(ec.steps)
    saliency = json.dumps({"method": method, "model": ref.model_dump(), "pixels": pixels}, indent=1)
    result = ExplainResult(
        method=method, model=ref, stride=ec.stride, variables=variable_channels(spec)[1],
        windows=list(explainer.windows.labels), layers=layers,
        saliency=ws.write_report_file("saliency.json", saliency),
        duration_s=round(time.monotonic() - started, 2),
        **_class_summary(ws, total, explainer, ref),
    )  # fmt: skip
    ws.write_result(result)
    return result


def _save_explanation_layer(
    ws: Workspace, explainer: Explainer, tile: Tile, layer: np.ndarray, ref: ModelRef
) -> dict:
    """Write one tile's explanation layer under explain/; its LayerFile as a dict."""
    stride, method = ws.config.explain.stride, method_text(explainer.steps)
    _, variables = variable_channels(explainer.spec)
    labels = explainer.windows.labels
    url = save_layer_cog(
        ws.url("explain", f"{tile.id}_explanation.tif"), layer,
        tile.geobox.zoom_out(stride),  # the grid the layer was computed on
        descriptions=["dominant variable", "dominant month"],
        tags={"method": method, "variables": ",".join(variables), "windows": ",".join(labels)},
    )  # fmt: skip
    return explanation_layer(url, method, variables, labels, stride, ref.model_dump()).to_dict()


def _class_summary(
    ws: Workspace, total: ClassAttribution, explainer: Explainer, ref: ModelRef
) -> dict:
    """The per-class plot (reports/explanations.png) and dominant variable and month per class."""
    if ws.config.labels is None:
        raise ValueError(
            f"config {ws.config.name!r} has no `labels` section: explain needs its nomenclature"
        )
    names = {c.code: c.name for c in load_nomenclature(ws.config.labels.nomenclature).classes}
    _, variables = variable_channels(explainer.spec)
    labels, heat = explainer.windows.labels, total.heat
    panels = {f"{names.get(k, k)} ({total.counts[k]} px)": heat[k] for k in sorted(heat)}
    title = f"|integrated gradients| per variable and month, model v{ref.version}"
    png = heatmap_png(panels, variables, explainer.windows, title)
    gap = np.abs(np.concatenate(total.gaps)) if total.gaps else np.zeros(1)
    return {
        "plot": ws.write_report_file("explanations.png", png),
        "pixels_explained": int(sum(total.counts.values())),
        "dominant_variable_per_class": {
            names.get(k, str(k)): variables[int(heat[k].sum(1).argmax())] for k in sorted(heat)
        },
        "dominant_month_per_class": {
            names.get(k, str(k)): labels[int(heat[k].sum(0).argmax())] for k in sorted(heat)
        },
        "completeness_gap_max": round(float(gap.max()), 5),
    }
