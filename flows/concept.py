"""Concept maps from plain-language prompts, and explanations of the class map (issue 9).

- `concept_map`: `pivotmap concept "TEXT"`: the champion's encoder + its text-alignment head over
  the configured region → one probability COG. A plain function, not a flow: an interactive
  question should not wait for a Prefect server to start.
- `concept_maps_flow`: the configured `concept.prompts`, per tile, published with the map.
- `explain_flow`: integrated gradients on a grid of pixels per tile → explanation layers
  (dominant variable and month), a variables × months plot per class in reports/, and the full
  saliency of the configured pixels in reports/saliency.json.

The run folder (`--workspace`, default the config file's folder) holds the cube and the MLflow
registry; the model is `models:/<model name>@<predict.model_alias>`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from pivotmap.config import RunConfig
from pivotmap.flows.workspace import Workspace
from pivotmap.models.inference import TileJob, _read_window, open_raw

ALIGN_FILES = ("text_align", "text_align_meta")
CALIBRATION = (
    "text-aligned encoder (linear head, InfoNCE on class descriptions); probability = "
    "sum_k softmax([z.t_1..z.t_K, z.p] * s)_k * r_k + softmax(...)_p with r_k = "
    "softmax_k(s * t_k.p) / max_k, z pixel projection, t_k class prototypes, p prompt, "
    "s learned scale"
)


def torch_threads(config: RunConfig):
    """Torch CPU threads as training uses them (`train.cpu_threads`), restored afterwards."""
    from pivotmap.flows.train import cpu_threads

    return cpu_threads("cpu", config.train.cpu_threads)


class ConceptError(LookupError):
    """No trained model or text-alignment head to draw a concept map with."""


def find_workspace(config_path: str | Path, workspace: str | Path | None) -> Path:
    """The run folder: `workspace`, else the config file's folder (as `pivotmap demo` writes it)."""
    root = Path(workspace) if workspace else Path(config_path).resolve().parent
    if not (root / "cube" / "pivot.zarr").exists():
        hint = "" if workspace else " (give the run folder with --workspace DIR)"
        raise ConceptError(
            f"no pivot cube under {root}{hint}; run `pivotmap produce --config FILE --out DIR` "
            "first, then pass --workspace DIR"
        )
    return root


def load_aligned_model(ws: Workspace, predicted: dict | None = None):
    """The champion network (or the one `predicted` names, as the predict stage saved it for
    its workers), its spec and version info, and its TextAlignment."""
    from pivotmap.models.inference import load_for_worker
    from pivotmap.models.registry import load_champion, load_model_files, tracking_uri_for
    from pivotmap.models.text_align import TextAlignment

    uri = tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri)
    name = ws.config.model_name
    try:
        if predicted:
            info = predicted
            model_dir = ws.root / "models" / f"{info['name']}-v{info['version']}"
            model, spec = load_for_worker(str(model_dir), "cpu")
        else:
            model, spec, info = load_champion(
                tracking_uri=uri, model_name=name, alias=ws.config.predict.model_alias
            )
    except LookupError as err:
        raise ConceptError(str(err)) from None
    files = load_model_files(
        tracking_uri=uri, model_name=name, version=info["version"], names=ALIGN_FILES
    )
    if set(files) != set(ALIGN_FILES):
        raise ConceptError(
            f"model {name} v{info['version']} has no text-alignment head (trained before it "
            "existed or with concept.enabled: false); run `pivotmap train --config FILE --out "
            "DIR` first"
        )
    alignment = TextAlignment.from_bytes(files["text_align"], files["text_align_meta"].decode())
    return model, spec, info, alignment


def _tile_job(ws: Workspace, tile, extent) -> TileJob:
    rows, cols = tile.slices_in(extent)
    return TileJob(
        tile_id=tile.id, rows=(rows.start, rows.stop), cols=(cols.start, cols.stop),
        pivot_url=ws.pivot_url, model_dir="", out_path="", batch_size=ws.config.predict.batch_size,
        window=ws.config.predict.window,
    )  # fmt: skip


def _windows(job: TileJob):
    h, w = job.rows[1] - job.rows[0], job.cols[1] - job.cols[0]
    for r in range(0, h, job.window):
        for c in range(0, w, job.window):
            yield r, c


def _inputs(ds, spec) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs of the pixels with data in a window, and that mask (flat)."""
    from pivotmap.models.features import day_of_year, has_data, network_input, raw_series

    series = raw_series(ds, spec.channels[:-2])
    ok = has_data(series)
    return network_input(series[ok], day_of_year(ds), spec), ok


def concept_tile(model, spec, alignment, prompts: np.ndarray, raw, job: TileJob) -> np.ndarray:
    """[P, h, w] uint8 percent (255 = no data) of each prompt embedding over one tile."""
    from pivotmap.models.text_align import concept_probability, pixel_embeddings

    h, w = job.rows[1] - job.rows[0], job.cols[1] - job.cols[0]
    out = np.full((len(prompts), h, w), 255, dtype=np.uint8)
    for r, c in _windows(job):
        ds = _read_window(raw, job, r, c, spec.step_days)
        x, ok = _inputs(ds, spec)
        emb = pixel_embeddings(model, x, job.batch_size)
        wh, ww = ds.sizes["y"], ds.sizes["x"]
        for i, p in enumerate(prompts):
            flat = np.full(wh * ww, 255, dtype=np.uint8)
            if ok.any():
                flat[ok] = np.rint(concept_probability(alignment, emb, p) * 100).astype(np.uint8)
            out[i, r : r + wh, c : c + ww] = flat.reshape(wh, ww)
    return out


def concept_map(
    config: RunConfig, workspace: str | Path, prompt: str, out_path: str | Path
) -> dict:
    """`pivotmap concept`: the prompt's probability over the region as one COG, and a summary."""
    from pivotmap.models.text_align import nearest_classes
    from pivotmap.tasks.concept_products import write_layer_cog

    started = time.monotonic()
    if not prompt.strip():
        raise ValueError("the concept prompt is empty: say in words what to map")
    ws = Workspace.open(config, workspace)
    model, spec, info, alignment = load_aligned_model(ws)
    embedding = alignment.embed([prompt])[0]
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    raw = open_raw(ws.pivot_url)
    mosaic = np.full((extent.height, extent.width), 255, dtype=np.uint8)
    for tile in tiles:
        job = _tile_job(ws, tile, extent)
        mosaic[slice(*job.rows), slice(*job.cols)] = concept_tile(
            model, spec, alignment, embedding[None], raw, job
        )[0]
    tags = {"prompt": prompt, "method": CALIBRATION, "model": f"{info['name']} v{info['version']}"}
    path = write_layer_cog(
        Path(out_path), mosaic, extent, descriptions=[f"P({prompt}) %"], tags=tags,
        resampling="AVERAGE",
    )  # fmt: skip
    valid = mosaic[mosaic != 255]
    return {
        "ok": True, "prompt": prompt, "map": str(path), "workspace": str(ws.root),
        "mean_probability": round(float(valid.mean()) / 100, 4) if valid.size else None,
        "share_above_50": round(float((valid >= 50).mean()), 4) if valid.size else None,
        "pixels": int(valid.size), "nearest_classes": nearest_classes(alignment, embedding),
        "model": info, "zero_shot": alignment.zero_shot, "method": CALIBRATION,
        "text_model": alignment.text_model, "duration_s": round(time.monotonic() - started, 2),
    }  # fmt: skip


@flow(name="concept-maps")
def concept_maps_flow(config: RunConfig, out_dir: str) -> dict:
    """Concept maps of `concept.prompts`, one COG per tile and prompt, for publishing."""
    from pivotmap.tasks.concept_products import concept_layer, prompt_slug, write_layer_cog

    started = time.monotonic()
    ws = Workspace.open(config, out_dir)
    prompts = list(dict.fromkeys(config.concept.prompts))
    try:
        model, spec, info, alignment = load_aligned_model(ws, ws.read_report("predict")["model"])
    except ConceptError as err:  # recorded, not fatal: the class map does not depend on it
        get_run_logger().warning("no concept maps: %s", err)
        summary = {"stage": "concept", "skipped": str(err), "layers": {}}
        ws.write_report("concept", summary)
        return summary
    embeddings = alignment.embed(prompts)
    tiles = ws.tiles()
    extent, raw = ws.extent(tiles), open_raw(ws.pivot_url)
    layers: dict[str, list[dict]] = {}
    for tile in tiles:
        job = _tile_job(ws, tile, extent)
        with torch_threads(config):
            maps = concept_tile(model, spec, alignment, embeddings, raw, job)
        for prompt, array in zip(prompts, maps, strict=True):
            path = ws.root / "concept" / f"{tile.id}_concept-{prompt_slug(prompt)}.tif"
            write_layer_cog(
                path, array, tile.geobox, descriptions=[f"P({prompt}) %"],
                tags={"prompt": prompt, "method": CALIBRATION}, resampling="AVERAGE",
            )  # fmt: skip
            layer = concept_layer(tile.id, path, prompt, CALIBRATION, info)
            layers.setdefault(tile.id, []).append(layer.to_dict())
    summary = {
        "stage": "concept", "prompts": prompts, "model": info, "layers": layers,
        "zero_shot": alignment.zero_shot, "duration_s": round(time.monotonic() - started, 2),
    }  # fmt: skip
    ws.write_report("concept", summary)
    return summary


# --- explanations -------------------------------------------------------------------------


def _grid_pixels(h: int, w: int, r: int, c: int, wh: int, ww: int, stride: int) -> np.ndarray:
    """Flat indices inside a window of the tile pixels on the explanation grid."""
    off = stride // 2
    rows = [i for i in range(wh) if (r + i) % stride == min(off, h - 1) % stride]
    cols = [j for j in range(ww) if (c + j) % stride == min(off, w - 1) % stride]
    return (np.asarray(rows)[:, None] * ww + np.asarray(cols)[None, :]).ravel()


def explain_tile(model, spec, raw, job: TileJob, windows, steps: int, stride: int) -> dict:
    """Explanation layer [2, ny, nx] of one tile, and per-class attribution sums for the plot."""
    from pivotmap.models.explain import dominant_layers, heatmap, integrated_gradients

    h, w = job.rows[1] - job.rows[0], job.cols[1] - job.cols[0]
    layer = np.full((2, -(-h // stride), -(-w // stride)), 255, dtype=np.uint8)
    heat, counts, gaps = {}, {}, []
    for r, c in _windows(job):
        ds = _read_window(raw, job, r, c, spec.step_days)
        x, ok = _inputs(ds, spec)
        wh, ww = ds.sizes["y"], ds.sizes["x"]
        picks = _grid_pixels(h, w, r, c, wh, ww, stride)
        keep = picks[ok[picks]]
        if not keep.size:
            continue
        rank = np.cumsum(ok) - 1  # flat window index -> row of x
        attr, target, gap = integrated_gradients(model, x[rank[keep]], steps=steps)
        var, win = dominant_layers(attr, spec, windows)
        ly, lx = (r + keep // ww) // stride, (c + keep % ww) // stride
        layer[0, ly, lx], layer[1, ly, lx] = var, win
        gaps.append(gap)
        for k in np.unique(target):
            code = int(spec.classes[k])
            heat[code] = heat.get(code, 0) + heatmap(attr[target == k], spec, windows)
            counts[code] = counts.get(code, 0) + int((target == k).sum())
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    return {"layer": layer, "heat": heat, "counts": counts, "gap": gap}


def _saliency(model, spec, raw, ws: Workspace, extent, windows, steps: int) -> list[dict]:
    """Full date × variable attributions of the configured pixels."""
    from pivotmap.models.explain import importance, integrated_gradients, variable_channels

    index, names = variable_channels(spec)
    out = []
    for x0, y0 in ws.config.explain.pixels:
        col, row = (int(np.floor(v)) for v in ~extent.affine * (x0, y0))
        entry = {"x": x0, "y": y0, "row": row, "col": col}
        if not (0 <= row < extent.height and 0 <= col < extent.width):
            out.append(entry | {"error": "outside the mapped region"})
            continue
        job = TileJob("pixel", (row, row + 1), (col, col + 1), ws.pivot_url, "", "", 1, 1)
        ds = _read_window(raw, job, 0, 0, spec.step_days)
        x, ok = _inputs(ds, spec)
        if not ok.any():
            out.append(entry | {"error": "no data in the cube at this pixel"})
            continue
        attr, target, gap = integrated_gradients(model, x, steps=steps)
        per_var, per_win = importance(attr, spec, windows)
        code = int(spec.classes[target[0]])
        out.append(
            entry | {
                "class": code, "completeness_gap": round(float(gap[0]), 5),
                "dates": [str(d)[:10] for d in ds.time.values], "variables": names,
                "attributions": np.round(attr[0][:, index], 5).tolist(),
                "dominant_variable": names[int(per_var[0].argmax())],
                "dominant_window": windows.labels[int(per_win[0].argmax())],
            }
        )  # fmt: skip
    return out


@flow(name="explain")
def explain_flow(config: RunConfig, out_dir: str) -> dict:
    """Explanation layers per tile, the per-class plot and the saliency of chosen pixels."""
    from pivotmap.models.explain import Windows, heatmap_png, method_text, variable_channels
    from pivotmap.models.inference import load_for_worker
    from pivotmap.tasks.concept_products import explanation_layer, write_layer_cog
    from pivotmap.tasks.nomenclature import load_nomenclature

    started, ec = time.monotonic(), config.explain
    ws = Workspace.open(config, out_dir)
    info = ws.read_report("predict")["model"]
    model, spec = load_for_worker(
        str(ws.root / "models" / f"{info['name']}-v{info['version']}"), "cpu"
    )
    raw = open_raw(ws.pivot_url)
    windows = Windows.monthly(raw.time.values[:: spec.step_days])
    _, variables = variable_channels(spec)
    method = method_text(ec.steps)
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    layers, heat, counts, gaps = {}, {}, {}, []
    for tile in tiles:
        with torch_threads(config):
            job = _tile_job(ws, tile, extent)
            done = explain_tile(model, spec, raw, job, windows, ec.steps, ec.stride)
        geobox = tile.geobox.zoom_out(ec.stride)  # the grid the layer was computed on
        tags = {"method": method, "variables": ",".join(variables)}
        path = write_layer_cog(
            ws.root / "explain" / f"{tile.id}_explanation.tif", done["layer"], geobox,
            descriptions=["dominant variable", "dominant month"],
            tags=tags | {"windows": ",".join(windows.labels)},
        )  # fmt: skip
        layer = explanation_layer(path, method, variables, windows.labels, ec.stride, info)
        layers[tile.id] = [layer.to_dict()]
        for code, values in done["heat"].items():
            heat[code] = heat.get(code, 0) + values
            counts[code] = counts.get(code, 0) + done["counts"][code]
        gaps.append(done["gap"])
    names = {c.code: c.name for c in load_nomenclature(config.labels.nomenclature).classes}
    panels = {f"{names.get(k, k)} ({counts[k]} px)": heat[k] for k in sorted(heat)}
    title = f"|integrated gradients| per variable and month, model v{info['version']}"
    plot = heatmap_png(panels, variables, windows, ws.reports_dir / "explanations.png", title)
    with torch_threads(config):
        saliency = _saliency(model, spec, raw, ws, extent, windows, ec.steps)
    (ws.reports_dir / "saliency.json").write_text(
        json.dumps({"method": method, "model": info, "pixels": saliency}, indent=1)
    )
    gap = np.abs(np.concatenate(gaps)) if gaps else np.zeros(1)
    summary = {
        "stage": "explain", "method": method, "model": info, "stride": ec.stride,
        "variables": variables, "windows": list(windows.labels), "layers": layers,
        "plot": str(plot), "saliency": str(ws.reports_dir / "saliency.json"),
        "pixels_explained": int(sum(counts.values())),
        "dominant_variable_per_class": {
            names.get(k, str(k)): variables[int(heat[k].sum(1).argmax())] for k in sorted(heat)
        },
        "dominant_month_per_class": {
            names.get(k, str(k)): windows.labels[int(heat[k].sum(0).argmax())] for k in sorted(heat)
        },
        "completeness_gap_max": round(float(gap.max()), 5),
        "duration_s": round(time.monotonic() - started, 2),
    }  # fmt: skip
    ws.write_report("explain", summary)
    return summary
