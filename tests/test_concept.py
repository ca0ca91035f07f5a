"""Concept maps: phrasings, the offline text encoder, the alignment head, `pivotmap concept`,
and the concept/explanation assets of a published demo run."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pivotmap.flows.cli import main
from pivotmap.models.text_align import (
    TextAlignment,
    class_similarity,
    concept_probability,
    fit_head,
    prototypes,
    zero_shot_figures,
)
from pivotmap.tasks.nomenclature import load_nomenclature

CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(argv: list[str], capsys) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_phrasings_are_optional_and_listed(tmp_path):
    flanders = load_nomenclature(CONFIGS / "flanders-nomenclature.yaml")
    built = flanders.by_code(60)
    assert built.phrasings[:2] == ["Built-up", built.description] and len(built.phrasings) == 5
    old = {"name": "n", "classes": [
        {"code": 1, "name": "A", "color": "#000000", "description": "a thing."},
        {"code": 2, "name": "B", "color": "#ffffff", "description": "b thing."},
    ]}  # fmt: skip
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(old))
    assert load_nomenclature(tmp_path / "n.yaml").by_code(2).phrasings == ["B", "b thing."]


def _clusters(k: int = 5, per: int = 200, dim: int = 16, seed: int = 0):
    """Pixel embeddings in k separable clusters and k random unit 'text' phrasings x 3."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    y = np.repeat(np.arange(k), per)
    emb = (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    text = [rng.normal(size=(3, 384)).astype(np.float32) for _ in range(k)]
    text = [t / np.linalg.norm(t, axis=1, keepdims=True) for t in text]
    return emb, y, text


def test_head_ranks_seen_classes_and_reports_zero_shot_in_range():
    torch.manual_seed(0)
    emb, y, text = _clusters()
    head = fit_head(emb, y, text, range(5), steps=100)
    sim = class_similarity(head, emb, prototypes(text))
    assert (sim.argmax(1) == y).mean() > 0.95  # chance is 0.2
    figures, seen = zero_shot_figures(emb, y, emb, y, text, [10, 20, 30, 40, 50], steps=60)
    assert (class_similarity(seen, emb, prototypes(text)).argmax(1) == y).mean() > 0.9
    for key in ("seen_top1", "heldout_top1", "null_heldout_top1", "chance_top1"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["seen_top1"] > 0.9 and figures["chance_top1"] == 0.2
    assert set(figures["heldout_per_class"]) == {10, 20, 30, 40, 50}
    assert 1 <= figures["heldout_mean_rank"] <= 5


def test_concept_probability_follows_the_matching_class(tmp_path):
    emb, y, text = _clusters(k=3)
    head = fit_head(emb, y, text, range(3), steps=100)
    alignment = TextAlignment(
        head=head, codes=(1, 2, 3), names=("a", "b", "c"), protos=prototypes(text),
        phrasings={1: ["a"], 2: ["b"], 3: ["c"]}, cache={"like b": text[1][0]},
    )  # fmt: skip
    p = concept_probability(alignment, emb, alignment.embed(["like b"])[0])
    assert p.min() >= 0 and p.max() <= 1
    assert p[y == 1].mean() > 0.8 and p[y != 1].mean() < 0.2
    files = alignment.save(tmp_path)  # safetensors + JSON, read back without pickle
    again = TextAlignment.from_bytes(
        files["text_align"].read_bytes(), files["text_align_meta"].read_text()
    )
    np.testing.assert_allclose(concept_probability(again, emb, text[1][0]), p, atol=1e-6)


def test_head_learns_descriptor_sentences_with_in_batch_negatives(tmp_path):
    """Two attributes that cut across the classes: only the sentences teach them."""
    from pivotmap.models.text_align import Sentences, fit_heads

    rng = np.random.default_rng(1)
    emb, y, text = _clusters(k=3, dim=16)
    wet = rng.random(len(y)) < 0.5  # an attribute no class names, visible in dimension 0
    emb[:, 0] = np.where(wet, 4.0, -4.0) + rng.normal(size=len(y))
    words = rng.normal(size=(2, 384)).astype(np.float32)
    words /= np.linalg.norm(words, axis=1, keepdims=True)
    sentences = Sentences.of(words, [np.array([int(w)]) for w in wet])
    plain, told = (
        fit_heads(emb, [(y, [0, 1, 2])], text, steps=150, sentences=s)[0] for s in (None, sentences)
    )
    for head, floor in ((told, 0.95), (plain, 0.0)):
        sim = class_similarity(head, emb, words)
        assert ((sim[:, 1] > sim[:, 0]) == wet).mean() >= floor
    assert (class_similarity(told, emb, prototypes(text)).argmax(1) == y).mean() > 0.9
    alignment = TextAlignment(
        head=told, codes=(1, 2, 3), names=("a", "b", "c"), protos=prototypes(text),
        phrasings={1: ["a"], 2: ["b"], 3: ["c"]}, cache={"wet": words[1], "dry": words[0]},
        sentences=["dry", "wet"],
    )  # fmt: skip
    files = alignment.save(tmp_path)
    again = TextAlignment.from_bytes(
        files["text_align"].read_bytes(), files["text_align_meta"].read_text()
    )
    assert again.sentences == ["dry", "wet"] and again.known_texts[-2:] == ["dry", "wet"]


def test_a_prompt_unlike_every_known_text_gets_a_warning():
    """'a lake' paraphrases a demo class; 'an airport runway' matches nothing it was fitted on."""
    from pivotmap.flows.concept import concept_markdown
    from pivotmap.models.concept import unknown_prompt_warning
    from pivotmap.results import ConceptResult, ModelRef
    from pivotmap.tasks.synthetic import CLASSES, PHRASINGS

    phrasings = {c.code: [c.name, c.description, *PHRASINGS[c.code]] for c in CLASSES}
    emb, y, text = _clusters(k=6)
    alignment = TextAlignment(
        head=fit_head(emb, y, text, range(6), steps=5), codes=tuple(phrasings),
        names=tuple(c.name for c in CLASSES), protos=prototypes(text), phrasings=phrasings,
        sentences=["Green from March and harvested in mid July", "Bright in radar"],
    )  # fmt: skip
    lake, runway, volcano = alignment.embed(["a lake", "an airport runway", "a volcano"])
    assert unknown_prompt_warning("a lake", alignment.known_similarity(lake)) is None
    for prompt, vector in (("an airport runway", runway), ("a volcano", volcano)):
        warning = unknown_prompt_warning(prompt, alignment.known_similarity(vector))
        assert warning and "not meaningful" in warning and prompt in warning
    result = ConceptResult(
        prompts=["an airport runway"], model=ModelRef(name="m", version="1", run_id="r", uri="models:/m/1"),
        warnings={"an airport runway": warning},
    )  # fmt: skip
    assert "Not meaningful: 'an airport runway'" in concept_markdown(result)


def test_text_encoder_loads_offline_without_network(monkeypatch):
    """The packaged all-MiniLM-L6-v2 loads from site-packages; any socket use would fail."""
    from pivotmap.models import text_align

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    text_align.text_encoder.cache_clear()
    vectors = text_align.embed_texts(["a lake", "open water", "a maize field"])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # semantics, not noise


def test_concept_without_a_run_names_what_to_run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config.write_text(yaml.safe_dump(raw))
    code, result = _run(["concept", "water", "--config", str(config), "--out", "x.tif"], capsys)
    assert code == 1 and "ConceptError" in result["error"] and "pivotmap produce" in result["error"]
    (tmp_path / "cube" / "pivot.zarr").mkdir(parents=True)  # a cube, but no model
    code, result = _run(["concept", "water", "--config", str(config), "--out", "x.tif"], capsys)
    assert code == 1 and "pivotmap train" in result["error"] and not Path("x.tif").exists()


# --- the demo, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_server):
    out = tmp_path_factory.mktemp("concept-demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--out", str(out), "--json"])
    assert code == 0, buffer.getvalue()[-2000:]
    return out, json.loads(buffer.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_demo_reports_zero_shot_figures(demo):
    out, summary = demo
    zs = summary["zero_shot"]
    assert zs["classes"] == 6 and zs["chance_top1"] == pytest.approx(1 / 6, abs=1e-3)
    assert zs["seen_top1"] > 0.8  # descriptions of seen classes rank first, chance is 0.17
    for key in ("heldout_top1", "null_heldout_top1"):
        assert 0.0 <= zs[key] <= 1.0
    train = json.loads((out / "reports" / "train.json").read_text())
    assert train["text_alignment"]["heldout_per_class"]
    # descriptions read as facts of the pixels' own series: no label, no training (issue 19)
    grounded = zs["grounded"]
    assert grounded["mean_rank"] < zs["chance_mean_rank"] - 1 and grounded["auc_class_mean"] > 0.75
    assert grounded["mean_rank_class_mean"] < zs["chance_mean_rank"] - 1
    assert abs(grounded["null_auc_class_mean"] - 0.5) < 0.1 and grounded["test_pixels"] > 500
    full = train["text_alignment"]["grounded"]
    per_class = [row["mean_rank"] for row in full["per_class"].values()]
    assert full["mean_rank_class_mean"] == pytest.approx(np.mean(per_class), abs=1e-3)
    top1 = [row["top1"] for row in full["per_class"].values()]
    assert full["top1_class_mean"] == pytest.approx(np.mean(top1), abs=1e-4)
    assert full["per_class"]["2"]["grounded_share"] == 1  # maize


@pytest.mark.slow
def test_concept_command_writes_a_probability_cog(demo, capsys):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    out, summary = demo
    tif = out / "lake.tif"
    code, result = _run(
        ["concept", "a lake", "--config", str(out / "demo.yaml"), "--out", str(tif)], capsys
    )
    assert code == 0, result
    assert cog_validate(str(tif))[0]
    with rasterio.open(tif) as src:
        p = src.read(1)
        assert src.crs.to_epsg() == 32631 and src.nodata == 255 and src.overviews(1)
        assert src.tags()["prompt"] == "a lake"
    assert p.max() <= 100 and (p != 255).all()
    assert result["nearest_classes"][0]["name"] == "Water"
    assert result["model"]["version"] == summary["mlflow"]["model_version"]
    assert 0 <= result["mean_probability"] <= 1 and result["zero_shot"]["seen_top1"] > 0.8
    with rasterio.open(out / "products" / summary["product_version"] / "mosaic_class.tif") as src:
        classes = src.read(1)
    assert p[classes == 6].mean() > 80 and p[classes != 6].mean() < 20
    assert "warning" not in result and result["known_text_similarity"] > 0.8
    runway = out / "runway.tif"
    code, result = _run(
        ["concept", "an airport runway", "--config", str(out / "demo.yaml"), "--out", str(runway)],
        capsys,
    )
    assert code == 0 and "not meaningful" in result["warning"]
    assert result["grounding"] == {"share": 0.0, "facts": []}  # nothing the series can show
    with rasterio.open(runway) as src:
        assert "not meaningful" in src.tags()["PIVOTMAP_WARNING"]
    # a concept no class description names, read as a fact of the pixels' own series
    october = out / "october.tif"
    code, result = _run(
        ["concept", "harvested in October", "--config", str(out / "demo.yaml"), "--out",
         str(october)], capsys,
    )  # fmt: skip
    assert code == 0 and result["grounding"]["share"] == 1, result
    assert [f["fact"][0] for f in result["grounding"]["facts"]] == ["harvest"]
    with rasterio.open(october) as src:
        q = src.read(1)
        assert "as 'harvested in" in src.tags()["grounding"]
    assert q[classes == 2].mean() > 60 and q[classes != 2].mean() < 20  # maize, and only maize


@pytest.mark.slow
def test_published_items_carry_concept_and_explanation_assets(demo, schema_dir):
    import pystac
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from pivotmap.tasks.stac_products import validate_offline

    out, summary = demo
    catalog = pystac.Catalog.from_file(str(out / "products" / "catalog.json"))
    assert validate_offline(catalog, schema_dir) > 4
    items = list(catalog.get_items(recursive=True))
    assert len(items) == 4
    for item in items:
        concept, explanation = item.assets["concept-a-lake"], item.assets["explanation"]
        assert concept.extra_fields["pivotmap:prompt"] == "a lake"
        assert "softmax" in concept.extra_fields["pivotmap:method"]
        assert explanation.extra_fields["pivotmap:method"].startswith("integrated-gradients")
        assert (
            explanation.extra_fields["pivotmap:model_version"] == summary["mlflow"]["model_version"]
        )
        path = Path(explanation.get_absolute_href())
        assert cog_validate(str(path))[0]
        with rasterio.open(path) as src:
            dominant = src.read(1)
            assert src.count == 2 and src.res == (80.0, 80.0)
        assert dominant[dominant != 255].max() < len(explanation.extra_fields["pivotmap:variables"])
    saliency = json.loads((out / "reports" / "saliency.json").read_text())["pixels"][0]
    assert len(saliency["attributions"]) == len(saliency["dates"])
    assert abs(saliency["completeness_gap"]) < 0.05
    assert (out / "reports" / "explanations.png").stat().st_size > 10_000
    assert "## Explanations" in (out / "reports" / "run-report.md").read_text()


def test_concept_maps_see_the_series_as_predict_classified_it(tmp_path):
    """Where predict moved the region's calendar, concept maps feed the network the same moved
    series (`predict_shift_steps`), while the facts are read in the region's own months."""
    from pivotmap.config import PredictConfig
    from pivotmap.models import grounding
    from pivotmap.models.concept import AlignedModel, TileSpan, concept_tile
    from pivotmap.models.inference import predict_shift_steps
    from pivotmap.models.network import ModelSpec, build_model
    from pivotmap.results import ModelRef, PredictResult
    from pivotmap.tasks.cube import PivotReader
    from pivotmap.tasks.pivot import build_pivot
    from tests.pivot_data import run_folder

    ws = run_folder(str(tmp_path / "run"))
    build_pivot(ws)
    spec = ModelSpec(classes=(1, 2, 3), n_steps=12, step_days=5, hidden=16)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():  # an untrained network embeds everything alike: spread it
        for p in model.parameters():
            p.mul_(4)
    ref = ModelRef(name="m", version="1", run_id="r", uri="models:/m/1")
    assert predict_shift_steps(ws, ref, spec) == 0  # predict has not run
    result = dict(
        model=ref, device="cpu", tiles=[], tiles_already_done=[], cache_key="k", pixels=0,
        px_per_s=0.0, duration_s=0.0, peak_rss_mb_per_worker=0.0,
        calendar_shift={"days": 15, "method": "auto"},
    )  # fmt: skip
    ws.write_result(PredictResult(**result))
    assert predict_shift_steps(ws, ref, spec) == 3
    other = ref.model_copy(update={"version": "2"})
    assert predict_shift_steps(ws, other, spec) == 0  # the shift was found for another model

    emb, y, text = _clusters(k=3)
    alignment = TextAlignment(
        head=fit_head(emb, y, text, range(3), steps=5), codes=(1, 2, 3), names=("a", "b", "c"),
        protos=prototypes(text), phrasings={},
    )  # fmt: skip
    aligned = AlignedModel(model, spec, ref, alignment)
    tiles = ws.tiles()
    span = TileSpan.of(tiles[0], ws.extent(tiles))
    prompt = text[0][:1]
    maize = grounding.ground("maize", lambda t: np.eye(len(t), 384, dtype=np.float32))
    assert maize.share == 1.0  # read through the lexicon alone: facts only, no head

    def maps(shift: int) -> np.ndarray:
        return concept_tile(
            aligned, np.concatenate([prompt, prompt]), PivotReader(ws.pivot_url), span,
            PredictConfig(window=16), [grounding.Grounding("", 1), maize], shift,
        )  # fmt: skip

    still, moved = maps(0), maps(3)
    assert not np.array_equal(still[0], moved[0])  # the network saw the moved series
    # the facts read the series as it is (read from the moved one, 27 % of these pixels differ)
    assert np.array_equal(still[1], moved[1]) and still[1].any()
