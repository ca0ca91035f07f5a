"""Concept maps: the probability of a plain-language prompt per pixel, from the encoder and its
text-alignment head (issue 9).

`concept_map` answers `pivotmap concept "TEXT"` over the region as one COG; it is a plain function,
not a flow, so an interactive question does not wait for a Prefect server to start. `concept_maps`
maps the configured `concept.prompts` per tile, for publishing with the class map.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from odc.geo.geobox import GeoBox
from torch import nn

from pivotmap.config import PredictConfig, RunConfig
from pivotmap.models import descriptors, grounding
from pivotmap.models.features import window_inputs
from pivotmap.models.inference import load_for_worker, predict_shift_steps
from pivotmap.models.network import ModelSpec
from pivotmap.models.registry import load_champion, load_model_files, tracking_uri_for
from pivotmap.models.text_align import (
    TextAlignment,
    concept_probability,
    nearest_classes,
    pixel_embeddings,
)
from pivotmap.models.training import cpu_threads
from pivotmap.results import ConceptResult, ModelRef, PredictResult
from pivotmap.runtime import run_logger
from pivotmap.tasks import storage
from pivotmap.tasks.concept_products import concept_layer, prompt_slug, save_layer_cog
from pivotmap.tasks.cube import PivotReader, iter_windows
from pivotmap.tasks.gazetteer import Place, clip_to_place, place_tiles
from pivotmap.tasks.grid import Tile
from pivotmap.tasks.workspace import Workspace

ALIGN_FILES = ("text_align", "text_align_meta")
CALIBRATION = (
    "text-aligned encoder (linear head, InfoNCE on class descriptions); probability = "
    "sum_k softmax([z.t_1..z.t_K, z.p] * s)_k * r_k + softmax(...)_p with r_k = "
    "softmax_k(s * t_k.p) / max_k, z pixel projection, t_k class prototypes, p prompt, "
    "s learned scale; blended with the share of the prompt grounded in descriptor facts "
    "(green-up, harvest, bare/flooded seasons, radar) times the share of those facts the "
    "pixel's own series holds"
)

# A prompt whose best cosine similarity to every text the head was fitted on (class phrasings,
# descriptor sentences) is below this matches nothing the model knows. Calibrated on the demo
# and Flanders nomenclatures with all-MiniLM-L6-v2: paraphrases of classes score 0.51-1.00
# ("a lake" 0.86, "houses" 0.78, "cropland" 0.51 on the demo), unrelated prompts 0.16-0.43
# ("an airport runway" 0.37, "a volcano" 0.29, "a glacier" 0.42).
KNOWN_TEXT_THRESHOLD = 0.45
WARNING_TAG = "PIVOTMAP_WARNING"


class ConceptError(LookupError):
    """No trained model or text-alignment head to draw a concept map with."""


@dataclass(frozen=True)
class AlignedModel:
    """A registered network, its spec and version, and its text-alignment head."""

    model: nn.Module
    spec: ModelSpec
    ref: ModelRef
    alignment: TextAlignment


@dataclass(frozen=True)
class TileSpan:
    """A tile's row and column span inside the cube, read in windows."""

    rows: tuple[int, int]
    cols: tuple[int, int]

    @classmethod
    def of(cls, tile: Tile, extent: GeoBox) -> TileSpan:
        rows, cols = tile.slices_in(extent)
        return cls((rows.start, rows.stop), (cols.start, cols.stop))

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(*self.rows), slice(*self.cols)

    def windows(self, size: int) -> Iterator[tuple[slice, slice]]:
        """Tile-relative (rows, cols) of each window (`absolute` gives the cube's slices)."""
        for rows, cols in iter_windows(self.rows, self.cols, size):
            yield (
                slice(rows.start - self.rows[0], rows.stop - self.rows[0]),
                slice(cols.start - self.cols[0], cols.stop - self.cols[0]),
            )

    def absolute(self, rows: slice, cols: slice) -> tuple[slice, slice]:
        return (
            slice(rows.start + self.rows[0], rows.stop + self.rows[0]),
            slice(cols.start + self.cols[0], cols.stop + self.cols[0]),
        )


def find_workspace(config_path: str | Path, workspace: str | None) -> str:
    """The run folder URL: `workspace`, else the config file's folder (as `pivotmap demo` writes
    it); it must hold a pivot cube."""
    root = storage.normalise(str(workspace or Path(config_path).resolve().parent))
    if not storage.exists(storage.join(root, "cube", "pivot.zarr")):
        hint = "" if workspace else " (give the run folder with --workspace DIR)"
        raise ConceptError(
            f"no pivot cube under {root}{hint}; run `pivotmap produce --config FILE --out DIR` "
            "first, then pass --workspace DIR"
        )
    return root


def load_aligned_model(ws: Workspace, predicted: ModelRef | None = None) -> AlignedModel:
    """The `predict.model_alias` network of the run's registry (or the version predict used, from
    the weights it saved for its workers) with its text-alignment head."""
    uri = tracking_uri_for(ws.root, ws.config.mlflow.tracking_uri)
    name = ws.config.model_name
    try:
        if predicted:
            ref = predicted
            model, spec = load_for_worker(ws.model_url(ref.name, ref.version), "cpu")
        else:
            alias = ws.config.predict.model_alias
            model, spec, info = load_champion(tracking_uri=uri, model_name=name, alias=alias)
            ref = ModelRef(**info)
    except LookupError as err:
        raise ConceptError(str(err)) from None
    files = load_model_files(
        tracking_uri=uri, model_name=ref.name, version=ref.version, names=ALIGN_FILES
    )
    if set(files) != set(ALIGN_FILES):
        raise ConceptError(
            f"model {ref.name} v{ref.version} has no text-alignment head (trained before it "
            "existed or with concept.enabled: false); run `pivotmap train --config FILE --out "
            "DIR` first"
        )
    alignment = TextAlignment.from_bytes(files["text_align"], files["text_align_meta"].decode())
    return AlignedModel(model, spec, ref, alignment)


def concept_tile(
    aligned: AlignedModel, prompts: np.ndarray, reader: PivotReader, span: TileSpan,
    predict: PredictConfig, groundings: Sequence[grounding.Grounding] = (), shift_steps: int = 0,
) -> np.ndarray:  # fmt: skip
    """[P, h, w] uint8 percent (255 = no data) of each prompt embedding over one tile; a prompt
    with a grounding (same order) blends in the share of its facts each pixel's series holds.
    The network sees the series moved `shift_steps` (the calendar shift predict classified
    with); the facts are read from the series as it is, in the region's own months."""
    out = np.full((len(prompts), *span.shape), 255, dtype=np.uint8)
    grounded = any(g.parts for g in groundings)
    for rows, cols in span.windows(predict.window):
        ds = reader.window(*span.absolute(rows, cols), step_days=aligned.spec.step_days)
        x, ok = window_inputs(ds, aligned.spec, shift_steps)
        emb = pixel_embeddings(aligned.model, x, predict.batch_size)
        own = window_inputs(ds, aligned.spec)[0] if shift_steps and grounded else x
        d = descriptors.compute(own, aligned.spec) if grounded and ok.any() else None
        facts = grounding.pixel_facts(d) if d is not None else None
        for i, prompt in enumerate(prompts):
            flat = np.full(ok.size, 255, dtype=np.uint8)
            if ok.any():
                p = concept_probability(aligned.alignment, emb, prompt)
                if d is not None and i < len(groundings) and groundings[i].parts:
                    g = groundings[i]
                    p = grounding.blend(p, grounding.fact_score(d, g, facts), g)
                flat[ok] = np.rint(p * 100).astype(np.uint8)
            out[i, rows, cols] = flat.reshape(ds.sizes["y"], ds.sizes["x"])
    return out


def grounding_tag(g: grounding.Grounding) -> str:
    """How the cube's descriptors read a prompt, for the COG's metadata."""
    if not g.parts:
        return "none (no clause states a fact the series can show)"
    facts = "; ".join(_read_as(p) for p in g.parts)
    return f"{g.share:.0%} of the prompt: {facts}"


def _read_as(p: grounding.Part) -> str:
    if p.via is None:
        return f"'{p.clause}' as {'not ' if p.negated else ''}'{p.phrase}' ({p.cosine:.2f})"
    return f"'{p.via}' as {'not ' if p.negated else ''}'{p.phrase}' (land-cover lexicon)"


def unknown_prompt_warning(prompt: str, similarity: float) -> str | None:
    """The warning for a prompt that matches nothing the model was fitted on, else None."""
    if similarity >= KNOWN_TEXT_THRESHOLD:
        return None
    return (
        f"'{prompt}' matches nothing the model knows (best cosine similarity {similarity:.2f} "
        f"to the class descriptions and descriptor sentences it was fitted on, below "
        f"{KNOWN_TEXT_THRESHOLD}): this map is not meaningful; describe the concept with the "
        "classes' words or what the sensors see (seasons, greenness, water, radar brightness)"
    )


def concept_map(
    config: RunConfig, workspace: str, prompt: str, out_path: str | Path, place: Place | None = None
) -> dict:
    """`pivotmap concept`: the prompt's probability over the region (or over `place`, within
    it: the pixels outside the place are no data) as one COG, and a summary."""
    started = time.monotonic()
    if not prompt.strip():
        raise ValueError("the concept prompt is empty: say in words what to map")
    ws = Workspace.open(config, workspace)
    tiles = ws.tiles()
    extent, covered = ws.extent(tiles), 1.0
    if place is not None:  # only the tiles it overlaps; outside them: an error, before the model
        tiles, covered = place_tiles(place, tiles)
    aligned = load_aligned_model(ws)
    embedding = aligned.alignment.embed([prompt])[0]
    reads_as = grounding.ground(prompt, aligned.alignment.embed)
    reader = PivotReader(ws.pivot_url)
    shift = predict_shift_steps(ws, aligned.ref, aligned.spec)
    mosaic = np.full((extent.height, extent.width), 255, dtype=np.uint8)
    for tile in tiles:
        span = TileSpan.of(tile, extent)
        maps = concept_tile(
            aligned, embedding[None], reader, span, config.predict, [reads_as], shift
        )
        mosaic[span.slices] = maps[0]
    ref = aligned.ref
    tags = {
        "prompt": prompt, "method": CALIBRATION, "model": f"{ref.name} v{ref.version}",
        "grounding": grounding_tag(reads_as),
    }  # fmt: skip
    if shift:
        tags["calendar_shift_days"] = str(shift * aligned.spec.step_days)
    if place is not None:
        mosaic, extent = clip_to_place(mosaic, extent, place, nodata=255)
        tags["place"] = f"{place.label} ({place.query!r})"
    known = aligned.alignment.known_similarity(embedding)
    warning = unknown_prompt_warning(prompt, known)
    if warning:
        tags[WARNING_TAG] = warning
        run_logger("concept").warning("%s", warning)
    path = save_layer_cog(
        str(out_path), mosaic, extent, descriptions=[f"P({prompt}) %"], tags=tags,
        resampling="AVERAGE",
    )  # fmt: skip
    valid = mosaic[mosaic != 255]
    return {
        "ok": True, "prompt": prompt, "map": path, "workspace": ws.root,
        "mean_probability": round(float(valid.mean()) / 100, 4) if valid.size else None,
        "share_above_50": round(float((valid >= 50).mean()), 4) if valid.size else None,
        "pixels": int(valid.size), "nearest_classes": nearest_classes(aligned.alignment, embedding),
        "model": ref.model_dump(), "zero_shot": aligned.alignment.zero_shot, "method": CALIBRATION,
        "text_model": aligned.alignment.text_model, "known_text_similarity": round(known, 4),
        "grounding": reads_as.to_dict(), **({"warning": warning} if warning else {}),
        "calendar_shift_days": shift * aligned.spec.step_days,
        **({"place": {**place.to_dict(), "covered_share": round(covered, 4)}} if place else {}),
        "duration_s": round(time.monotonic() - started, 2),
    }  # fmt: skip


def concept_maps(ws: Workspace) -> ConceptResult:
    """Concept maps of `concept.prompts` with the model predict used, one COG per tile and
    prompt under concept/; without a text-alignment head the stage is skipped, not failed."""
    started = time.monotonic()
    prompts = list(dict.fromkeys(ws.config.concept.prompts))
    try:
        aligned = load_aligned_model(ws, ws.read_result(PredictResult).model)
    except ConceptError as err:  # recorded, not fatal: the class map does not depend on it
        run_logger("concept").warning("no concept maps: %s", err)
        result = ConceptResult(skipped=str(err))
        ws.write_result(result)
        return result
    embeddings = aligned.alignment.embed(prompts)
    groundings = [grounding.ground(p, aligned.alignment.embed) for p in prompts]
    similarity = [round(aligned.alignment.known_similarity(e), 4) for e in embeddings]
    known = dict(zip(prompts, similarity, strict=True))
    warnings = {p: w for p in prompts if (w := unknown_prompt_warning(p, known[p]))}
    for warning in warnings.values():
        run_logger("concept").warning("%s", warning)
    tiles = ws.tiles()
    extent, reader = ws.extent(tiles), PivotReader(ws.pivot_url)
    shift = predict_shift_steps(ws, aligned.ref, aligned.spec)
    layers: dict[str, list[dict]] = {}
    for tile in tiles:
        span = TileSpan.of(tile, extent)
        with cpu_threads("cpu", ws.config.train.cpu_threads):
            maps = concept_tile(
                aligned, embeddings, reader, span, ws.config.predict, groundings, shift
            )
        for prompt, g, array in zip(prompts, groundings, maps, strict=True):
            layer = _save_concept_layer(
                ws, tile, prompt, array, aligned.ref, warnings.get(prompt), grounding_tag(g)
            )
            layers.setdefault(tile.id, []).append(layer)
    result = ConceptResult(
        prompts=prompts, model=aligned.ref, layers=layers, zero_shot=aligned.alignment.zero_shot,
        known_text_similarity=known, warnings=warnings,
        groundings={p: g.to_dict() for p, g in zip(prompts, groundings, strict=True)},
        duration_s=round(time.monotonic() - started, 2),
    )  # fmt: skip
    ws.write_result(result)
    return result


def _save_concept_layer(
    ws: Workspace, tile: Tile, prompt: str, array: np.ndarray, ref: ModelRef,
    warning: str | None = None, grounded: str | None = None,
) -> dict:  # fmt: skip
    """Write one tile's concept map under concept/ (tagged with the unknown-prompt warning, if
    any, and with how the prompt was grounded); its LayerFile as a dict."""
    tags = {"prompt": prompt, "method": CALIBRATION, **({WARNING_TAG: warning} if warning else {})}
    if grounded:
        tags["grounding"] = grounded
    url = save_layer_cog(
        ws.url("concept", f"{tile.id}_concept-{prompt_slug(prompt)}.tif"), array, tile.geobox,
        descriptions=[f"P({prompt}) %"], tags=tags, resampling="AVERAGE",
    )  # fmt: skip
    return concept_layer(url, prompt, CALIBRATION, ref.model_dump()).to_dict()
