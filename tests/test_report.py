"""Run reports, per-tile status, quality pages, structured logs, and resume by cache key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pivotmap.config import RunConfig
from pivotmap.flows.demo import demo_config_dict
from pivotmap.flows.report import (
    operations_markdown,
    tile_status_rows,
    train_markdown,
    write_quality_html,
)
from pivotmap.results import IngestResult, PivotResult, ProduceResult, TrainResult
from pivotmap.runtime import kv
from pivotmap.tasks.quality import quality_html
from pivotmap.tasks.workspace import Workspace

PIVOT = {
    "stage": "pivot",
    "cube": "/x/cube/pivot.zarr",
    "mode": "full",
    "reason": "new cube",
    "duration_s": 1.0,
    "cube_version": "abc123",
    "tiles_written": [{"tile": "T1"}],
    "tiles_already_done": ["T2"],
    "quality": {
        "suite": "pivot_cube",
        "success": False,
        "failed_critical": ["B04 values in [-0.2, 1.6]: 3.0% outside"],
        "failed_warning": ["median VV in [-30, 0]: observed 4.2"],
        "evaluated": 12,
        "statistics": {"pixels": 10, "gx": {"evaluated_expectations": 11}},
    },
}
INGEST = {
    "tiles": ["T1", "T2"], "duration_s": 1.0,
    "modalities": {
        "s2": {
            "collection": "sentinel-2-l2a", "items_found": 5, "items_used": 4, "dates": 4,
            "skipped_items": [{"item": "x", "reason": "cloudy"}], "item_ids": ["a", "b", "c", "d"],
            "tiles_written": [], "tiles_already_done": ["T1", "T2"], "cache_key": "k-s2",
            "cube": "/x/cube/obs_s2.zarr",
        }
    }
}  # fmt: skip
STAGES = [IngestResult.model_validate(INGEST), PivotResult.model_validate(PIVOT)]


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(RunConfig.model_validate(demo_config_dict()), tmp_path)


def test_tile_status_says_what_was_written_and_why_the_rest_was_skipped():
    rows = tile_status_rows(STAGES)
    status = {(r["stage"], r["tile"]): (r["status"], r["reason"]) for r in rows}
    assert status[("pivot", "T1")] == ("written", "")
    assert status[("pivot", "T2")][0] == "skipped" and "abc123" in status[("pivot", "T2")][1]
    assert status[("ingest-s2", "T1")] == (
        "skipped",
        "already done with the same inputs (cache key k-s2)",
    )
    assert tile_status_rows([]) == []


def test_quality_page_shows_the_failures_and_the_verdict(ws):
    page = quality_html(PIVOT["quality"])
    assert "FAILED" in page and "3.0% outside" in page and "observed 4.2" in page
    assert "evaluated_expectations" in page
    passed = {**PIVOT["quality"], "success": True, "failed_critical": [], "failed_warning": []}
    assert "passed" in quality_html(passed) and "<p>None.</p>" in quality_html(passed)
    path = Path(write_quality_html(ws, PIVOT["quality"]))
    assert path.name == "quality-pivot-cube.html" and "<html>" in path.read_text()


def test_operations_section_links_quality_pages_and_products(ws, tmp_path):
    summary = ProduceResult(
        config="demo", config_hash="h", period="2023-01-01/2023-12-31", tiles=2,
        items_used={"s2": 4}, items_skipped={"s2": 1}, cube="/x/cube/pivot.zarr",
        cube_version="abc123", map="/x/mosaic.vrt", quicklook="/x/quicklook.png",
        stac_catalog="/x/catalog.json", product_version="m1-cabc123",
        mlflow={"tracking_uri": "sqlite:///x", "model": "m", "model_version": "1", "run_id": "r"},
        duration_s=1.0,
    )  # fmt: skip
    text = operations_markdown(ws, summary, STAGES)
    assert "4 items used of 5 found, 1 skipped" in text
    assert "| pivot | T2 | skipped |" in text
    assert f"({(tmp_path / 'reports' / 'quality-pivot-cube.html').as_uri()})" in text
    assert "FAILED" in text and "file:///x/mosaic.vrt" in text
    assert "| ingest-s2 | 2 | 0 | 2 | 0 | 0 |" in text and "| pivot | 2 | 1 | 1 | 0 | 0 |" in text


def test_product_links_are_urls_under_the_public_base_url(tmp_path):
    from pivotmap.flows.report import product_url

    raw = demo_config_dict()
    raw["publish"] = {**raw.get("publish", {}), "base_url": "https://maps.example.org/landcover"}
    ws = Workspace.open(RunConfig.model_validate(raw), tmp_path)
    products = ws.products_url
    summary = ProduceResult(
        config="demo", config_hash="h", period="2023-01-01/2023-12-31", tiles=2,
        items_used={"s2": 4}, items_skipped={"s2": 1}, cube="/x/cube/pivot.zarr",
        cube_version="abc123", map=f"{products}/m1-cabc123/mosaic_class.vrt",
        quicklook=f"{products}/m1-cabc123/quicklook.png", stac_catalog=f"{products}/catalog.json",
        product_version="m1-cabc123",
        mlflow={"tracking_uri": "sqlite:///x", "model": "m", "model_version": "1", "run_id": "r"},
        duration_s=1.0,
    )  # fmt: skip
    text = operations_markdown(ws, summary, STAGES)
    base = "https://maps.example.org/landcover"
    assert (
        f"- map: [{base}/m1-cabc123/mosaic_class.vrt]({base}/m1-cabc123/mosaic_class.vrt)" in text
    )
    assert f"({base}/catalog.json)" in text and f"({base}/m1-cabc123/quicklook.png)" in text
    assert "file://" not in text.split("## Products")[1]
    assert product_url(ws, "/elsewhere/x.tif") == "file:///elsewhere/x.tif"  # not a product


def test_train_markdown_names_the_model_and_its_scores():
    summary = {
        "model_name": "m", "model_version": "3", "overall_accuracy": 0.9, "macro_f1": 0.8,
        "kappa": 0.7, "n_test_pixels": 100, "split": "blocks", "promotion_reason": "better",
        "run_id": "r", "model_uri": "models:/m/3", "cube_version": "c", "device": "cpu",
        "baseline": {"overall_accuracy": 0.5, "macro_f1": 0.4},
        "per_class_f1": {}, "confusion_matrix": [], "classes": [], "student": None,
        "pretraining": None, "n_train_pixels": 1000, "label_fraction": 0.1, "promoted": True,
        "champion_version": "3", "validation_key": "v", "parameters": 1, "flops_per_pixel": 1.0,
        "n_steps": 1, "cube_url": "/x/cube/pivot.zarr", "code_version": "0.1.0", "final_loss": 0.1,
    }  # fmt: skip
    text = train_markdown(TrainResult.model_validate(summary))
    assert "`m` v3" in text and "macro-F1 0.800" in text and "baseline: OA 0.500" in text


def test_structured_log_lines_are_key_value():
    assert kv("pivot.tile", tile="T1", status="written") == "pivot.tile tile=T1 status=written"
    assert kv("x", reason="two words", empty="") == 'x reason="two words" empty=""'


# ---------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def small_region(tmp_path_factory):
    """Four 32 px tiles, two months: the generated data, shared by the resume tests."""
    from pivotmap.flows.demo import prepare_demo

    out = tmp_path_factory.mktemp("resume")
    prepare_demo(out, 7, 2, 32, "2023-05-01", "2023-06-30")
    return out


def _ingest(out, overrides=None):
    from pivotmap.config import load_run_config
    from pivotmap.tasks.ingest import ingest

    config = load_run_config(out / "demo.yaml", overrides=overrides)
    return ingest(Workspace.open(config, out), False).to_dict()["modalities"]["s2"]


def _written(summary) -> set[str]:
    return {t["tile"] for t in summary["tiles_written"]}


def test_resume_redoes_only_missing_tiles_and_all_on_changed_inputs(small_region):
    out = small_region
    first = _ingest(out)
    tiles = _written(first)
    assert len(tiles) == 4 and first["tiles_already_done"] == []
    marker = out / "state" / "ingest-s2" / f"{sorted(tiles)[0]}.json"
    assert json.loads(marker.read_text())["key"] == first["cache_key"]  # the key is recorded

    again = _ingest(out)  # same inputs: nothing is read again
    assert _written(again) == set() and set(again["tiles_already_done"]) == tiles
    assert again["cache_key"] == first["cache_key"]

    marker.unlink()  # a crash before this tile was marked: only it is redone
    resumed = _ingest(out)
    assert _written(resumed) == {marker.stem} and len(resumed["tiles_already_done"]) == 3

    changed = _ingest(out, {"ingest": {"scl_dilation_px": 1}})  # an input of the key changed
    assert _written(changed) == tiles and changed["cache_key"] != first["cache_key"]


def _produce(trained: str, used: str) -> ProduceResult:
    return ProduceResult(
        config="demo", config_hash="h", period="2023-01-01/2023-12-31", tiles=4,
        items_used={"s2": 4}, items_skipped={"s2": 0}, cube="/x/pivot.zarr", cube_version="c1",
        map="/x/map.vrt", quicklook="/x/q.png", stac_catalog="/x/catalog.json",
        product_version="m1", duration_s=1.0, overall_accuracy=0.9, macro_f1=0.8, kappa=0.7,
        per_class_f1={"1": 0.8}, promoted=trained == used,
        promotion_reason="champion v1 validated on a different key; kept v1",
        mlflow={"model": "pivotmap-demo", "model_version": used, "run_id": "r",
                "trained_version": trained},
    )  # fmt: skip


def test_run_report_names_the_model_that_made_the_map_and_the_one_scored():
    from pivotmap.flows.report import run_report_markdown

    kept = run_report_markdown(_produce(trained="2", used="1"))
    assert "map made with model `pivotmap-demo` v1" in kept
    assert "Scores of `pivotmap-demo` v2, trained in this run" in kept
    assert "The map was made with v1 (@champion), not with v2" in kept
    assert "`pivotmap promote 2 --config FILE --out DIR`" in kept
    promoted = run_report_markdown(_produce(trained="2", used="2"))
    assert "Scores of `pivotmap-demo` v2" in promoted and "not with" not in promoted


def test_per_class_f1_is_labelled_by_class_name(tmp_path):
    import yaml

    from pivotmap.flows.report import class_names, run_report_markdown
    from pivotmap.tasks.synthetic import _nomenclature_dict

    legend = tmp_path / "nomenclature.yaml"
    legend.write_text(yaml.safe_dump(_nomenclature_dict(42), sort_keys=False))
    raw = demo_config_dict()
    raw["labels"]["nomenclature"] = str(legend)
    ws = Workspace.open(RunConfig.model_validate(raw), tmp_path / "out")
    names = class_names(ws, STAGES)  # no publish result here: the run's nomenclature
    first = _nomenclature_dict(42)["classes"][0]
    assert names[str(first["code"])] == first["name"]
    text = run_report_markdown(_produce(trained="1", used="1"), names)
    assert f"| {names['1']} | 1 | 0.800 |" in text
    assert "| class 1 | 1 | 0.800 |" in run_report_markdown(_produce("1", "1"))  # no legend


def test_report_images_resolve_beside_the_file_and_inside_the_artifact(ws):
    import base64

    from pivotmap.flows.report import data_uri, run_report_markdown

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    plot = ws.write_report_file("explanations.png", png)
    run = _produce("1", "1").model_copy(update={"explanations": {
        "plot": plot, "method": "integrated gradients", "dominant_variable_per_class": {},
        "dominant_month_per_class": {},
    }})  # fmt: skip
    assert "![attributions](explanations.png)" in run_report_markdown(run)  # beside the .md
    embedded = run_report_markdown(run, image=data_uri)
    uri = embedded.split("![attributions](", 1)[1].split(")", 1)[0]
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png
