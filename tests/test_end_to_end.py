"""The whole chain for real: demo region and the real Flanders patch, through the CLI entry point.

Prefect runs on one temporary server for the session, MLflow on SQLite under the run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pivotmap.flows.cli import main
from pivotmap.models.grounding import FIGURES

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "configs"


def _run(argv: list[str], capsys) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def _digests(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_server):
    """One demo run (generate + produce), shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()  # capsys is function-scoped; a module fixture reads stdout by hand
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--out", str(out), "--json"])
    assert code == 0, buffer.getvalue()[-2000:]
    return out, json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_demo_products_are_complete_and_traceable(demo, schema_dir):
    import pystac
    import xarray as xr
    from rio_cogeo.cogeo import cog_validate

    from pivotmap.tasks.stac_products import validate_offline

    out, summary = demo
    assert summary["ok"] and summary["tiles"] == 4 and summary["overall_accuracy"] > 0.9
    for key in ("map", "quicklook", "stac_catalog", "cube"):
        assert Path(summary[key]).exists(), key
    cogs = sorted((out / "products").rglob("*.tif"))
    # 4 tiles × (class, confidence, concept map, explanation layer) + the mosaic as one COG
    assert len(cogs) == 17 and all(cog_validate(str(p))[0] for p in cogs)
    catalog = pystac.Catalog.from_file(summary["stac_catalog"])
    assert validate_offline(catalog, schema_dir) > 4
    items = list(catalog.get_items(recursive=True))
    assert len(items) == 4
    for item in items:
        assert item.properties["pivotmap:model_version"] == summary["mlflow"]["model_version"]
        assert item.properties["pivotmap:cube_version"] == summary["cube_version"]
    cube = xr.open_zarr(summary["cube"])  # plain xarray, as a user without pivotmap would
    assert {"B04", "VV", "age_s2", "age_s1"} <= set(cube.data_vars) and cube.sizes["time"] == 365
    assert cube.B04.attrs["grid_mapping"] == "spatial_ref" and "age_definition" in cube.attrs
    assert float(cube.age_s2.min()) >= 0
    report = (out / "reports" / "run-report.md").read_text()
    assert (
        "Accuracy on spatially held-out labels" in report and summary["product_version"] in report
    )


def test_champion_resolves_to_the_published_model(demo):
    from pivotmap.models.registry import load_champion, tracking_uri_for

    out, summary = demo
    _, spec, info = load_champion(tracking_uri=tracking_uri_for(out), model_name="pivotmap-demo")
    assert (
        info["version"] == summary["mlflow"]["model_version"]
        and info["run_id"] == summary["mlflow"]["run_id"]
    )
    assert spec.classes == (1, 2, 3, 4, 5, 6)


def test_rerun_resumes_and_republishing_is_idempotent(demo, capsys):
    out, summary = demo
    before = _digests(out / "products", "*")
    code, again = _run(
        ["produce", "--config", str(out / "demo.yaml"), "--out", str(out), "--no-train"], capsys
    )
    assert code == 0 and again["product_version"] == summary["product_version"]
    ingest = json.loads((out / "reports" / "ingest.json").read_text())
    assert all(
        not m["tiles_written"] and len(m["tiles_already_done"]) == 4
        for m in ingest["modalities"].values()
    )
    assert json.loads((out / "reports" / "publish.json").read_text())["already_published"] is True
    assert _digests(out / "products", "*") == before


def test_second_demo_run_gives_byte_identical_cogs(demo, tmp_path, capsys):
    out, _ = demo
    config = yaml.safe_load((out / "demo.yaml").read_text())
    config["source"]["url"] = str(out / "data" / "catalog.json")
    config["labels"] = {
        "url": str(out / "data/labels/lc.tif"),
        "nomenclature": str(out / "data/labels/nomenclature.yaml"),
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _ = _run(["produce", "--config", str(path), "--out", str(tmp_path / "again")], capsys)
    assert code == 0
    first, second = (
        _digests(out / "products", "*.tif"),
        _digests(tmp_path / "again" / "products", "*.tif"),
    )
    assert len(first) == 17 and first == second  # with concept maps and explanation layers
    vrt = "*.vrt"
    assert _digests(out / "products", vrt) == _digests(tmp_path / "again" / "products", vrt)


def test_failed_map_gate_publishes_nothing(demo, tmp_path, capsys):
    out, summary = demo
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("data"))
    config = yaml.safe_load((out / "demo.yaml").read_text())
    config["source"]["url"] = str(out / "data" / "catalog.json")
    config["labels"] = {
        "url": str(out / "data/labels/lc.tif"),
        "nomenclature": str(out / "data/labels/nomenclature.yaml"),
    }
    path = copy / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    tile = sorted((copy / "maps").glob("*.npz"))[0]
    with np.load(tile) as data:
        classes, confidence = data["classes"].copy(), data["confidence"]
    classes[:8, :8] = 77  # a code the nomenclature does not know
    np.savez_compressed(tile, classes=classes, confidence=confidence)
    catalog_before = (copy / "products" / "catalog.json").read_bytes()
    code, result = _run(["publish", "--config", str(path), "--out", str(copy)], capsys)
    assert code == 1 and "QualityGateError" in result["error"] and "77" in result["error"]
    assert (copy / "products" / "catalog.json").read_bytes() == catalog_before
    assert sorted(p.name for p in (copy / "products").iterdir()) == [
        "catalog.json",
        summary["product_version"],
    ]


@pytest.mark.realdata
def test_flanders_real_patch_end_to_end(flanders, tmp_path, capsys):
    code, summary = _run(
        [
            "produce",
            "--config",
            str(CONFIGS / "flanders.yaml"),
            "--out",
            str(tmp_path / "flanders"),
        ],
        capsys,
    )
    assert code == 0, summary
    assert summary["items_used"] == {"s2": 118, "s1": 159}
    # Majority class (99) is 43 % of the labelled pixels: the model must do much better.
    assert summary["overall_accuracy"] > 0.6 and summary["macro_f1"] > 0.4
    publish = json.loads((tmp_path / "flanders" / "reports" / "publish.json").read_text())
    assert publish["validated"]
    # issue 19 on real data: the class descriptions, read as facts of each test pixel's own
    # series (no label, no training), rank each held-out class (counted once) more than one
    # position better than chance (2.5 among 4), and the null sits at chance
    train = json.loads((tmp_path / "flanders" / "reports" / "train.json").read_text())
    grounded = train["text_alignment"]["grounded"]
    assert grounded["mean_rank_class_mean"] < 1.5 and grounded["auc_class_mean"] > 0.75
    assert abs(grounded["null_auc_class_mean"] - 0.5) < 0.1 and grounded["null_mean_rank"] > 2.3
    figures = {k: summary[k] for k in ("overall_accuracy", "macro_f1", "kappa", "per_class_f1")}
    print(json.dumps(figures | {"grounded": {k: grounded[k] for k in FIGURES}}))


def test_publish_and_rollback_keep_a_stac_api_database_in_step(demo, tmp_path, capsys):
    """`publish.stac_api`: the run's products land in an operator's pgstac (migrated by
    publish), asset hrefs under `publish.base_url`; `rollback --stac-api` loads them again."""
    from pivotmap.tasks import pgstac_server

    if (missing := pgstac_server.missing_server()) is not None:
        pytest.skip(missing)
    import psycopg

    out, summary = demo
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("data", "products"))
    config = yaml.safe_load((out / "demo.yaml").read_text())
    config["source"]["url"] = str(out / "data" / "catalog.json")
    config["labels"] = {
        "url": str(out / "data/labels/lc.tif"),
        "nomenclature": str(out / "data/labels/nomenclature.yaml"),
    }
    pg = pgstac_server.Postgres()
    try:
        pg.start()
        pgstac_server.create_database(pg)  # an empty database: publish migrates it
        config["publish"] |= {"stac_api": pg.dsn(), "base_url": "https://maps.example/lc/"}
        path = copy / "demo.yaml"
        path.write_text(yaml.safe_dump(config))
        code, result = _run(["publish", "--config", str(path), "--out", str(copy)], capsys)
        assert code == 0, result
        publish = json.loads((copy / "reports" / "publish.json").read_text())
        collection = json.loads(Path(publish["collection"]).read_text())["id"]
        assert publish["stac_api"] == {collection: 4}
        with psycopg.connect(pg.dsn()) as conn:
            rows = conn.execute(
                "SELECT content->'properties'->>'version', content->'assets'->'class'->>'href' "
                "FROM pgstac.items WHERE collection = %s",
                (collection,),
            ).fetchall()
        assert {v for v, _ in rows} == {summary["product_version"]}
        assert all(href.startswith("https://maps.example/lc/") for _, href in rows)
        code, back = _run(
            ["rollback", summary["product_version"], "--out", str(copy),
             "--stac-api", pg.dsn()], capsys,
        )  # fmt: skip
        assert code == 0 and back["stac_api"] == {collection: 4}
    finally:
        pg.remove()
