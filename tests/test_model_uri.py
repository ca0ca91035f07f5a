"""Map anywhere with a registered model: `predict.model_uri` on another run's tracking server.

Region A (generated, labelled) is ingested, pivoted, sampled and trained through the CLI into
its own run folder, registering `pivotmap-demo` on an explicit SQLite tracking store. Region B
is another generated region (another seed) whose config has no `labels` section: it names A's
champion by URI and A's tracking store, and goes through ingest, pivot, predict and publish in
a fresh folder. A cube gap-filled otherwise (another `pivot.max_hold_days`) is refused before a
map is written, and a URI that does not resolve is named in the error.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.small_runs import TILES, cli, generate_small_region, small_config

slow = pytest.mark.slow

MODEL = "pivotmap-demo"
# no text alignment, prediction in this process: the registry and the cube check are tested
QUIET = {"concept": {"enabled": False}, "predict": {"dask": "none"}}


def _cli(argv: list[str]) -> tuple[int, dict]:
    """`pivotmap ARGV --json`: (exit code, its JSON summary)."""
    code, summary, _ = cli(argv)
    return code, summary


def _run(config: Path, out: Path, stages: tuple[str, ...]) -> dict[str, dict]:
    """Each stage in turn; stop at the first that fails (its summary names the error)."""
    done = {}
    for stage in stages:
        code, summary = _cli([stage, "--config", str(config), "--out", str(out)])
        done[stage] = summary
        assert code == 0, f"{stage} failed: {summary.get('error')}"
    return done


def _has_sample_stage() -> bool:
    from pivotmap.flows.cli import STAGES

    return "sample" in STAGES


def _config(data_dir: str, tracking_db: Path, **extra) -> dict:
    """The small demo config of a generated region, paths relative to the config file."""
    return small_config(data_dir, tracking_db, QUIET, extra)


def _generate(folder: Path, seed: int) -> None:
    generate_small_region(folder, seed)


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def region_a(prefect_server, tmp_path_factory) -> dict:
    """Region A trained through the CLI: its tracking store and the registered version."""
    root = tmp_path_factory.mktemp("region-a")
    _generate(root / "data", seed=42)
    db = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    config = _write(root / "a.yaml", _config("data", db))
    stages = ("ingest", "pivot", *(("sample",) if _has_sample_stage() else ()), "train")
    done = _run(config, root / "run", stages)
    return {"db": db, "train": done["train"], "root": root}


@pytest.fixture(scope="module")
def region_b(region_a, tmp_path_factory) -> dict:
    """Region B (another seed), a config without labels that names A's champion, ingested and
    pivoted; its config lives in its own folder and the commands run from another one."""
    root = tmp_path_factory.mktemp("region-b")
    _generate(root / "inputs", seed=7)
    raw = _config("inputs", region_a["db"], predict={"model_uri": f"models:/{MODEL}@champion"})
    raw.pop("labels")
    raw["name"] = "region-b"
    config = _write(root / "configs" / "b.yaml", _relative(raw, "../inputs", "inputs"))
    out = tmp_path_factory.mktemp("run-b")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))  # relative paths follow the file, not cwd
        _run(config, out, ("ingest", "pivot"))
    return {"root": root, "config": config, "out": out, "raw": raw}


def _relative(raw: dict, new: str, old: str) -> dict:
    """RAW with its `old/…` paths as `new/…` (the config sits one folder below)."""
    text = json.dumps(raw).replace(f'"{old}/', f'"{new}/')
    return json.loads(text)


@slow
def test_new_region_without_labels_maps_with_the_champion_of_another_run(region_a, region_b):
    out = region_b["out"]
    done = _run(region_b["config"], out, ("predict", "publish"))
    version = region_a["train"]["model_version"]
    assert done["predict"]["model"]["name"] == MODEL
    assert done["predict"]["model"]["version"] == version
    assert done["predict"]["model"]["uri"] == f"models:/{MODEL}/{version}"
    assert not (out / "mlflow").exists()  # the model came from A's store: B keeps none
    assert done["publish"]["published"] is True

    nomenclature = yaml.safe_load(
        (region_b["root"] / "inputs/labels/nomenclature.yaml").read_text()
    )
    codes = {c["code"] for c in nomenclature["classes"]} | {255}
    maps = sorted((out / "maps").glob("*.npz"))
    assert len(maps) == TILES * TILES
    for path in maps:
        with np.load(path) as tile:
            found = set(np.unique(tile["classes"]).tolist())
            assert found <= codes, f"{path.name}: codes {found - codes} outside the legend"
            assert found - {255}, f"{path.name} has no class at all"

    catalog = Path(done["publish"]["catalog"])
    items = [json.loads(p.read_text()) for p in catalog.parent.rglob("*.json")]
    items = [i for i in items if i.get("type") == "Feature"]
    assert items
    for item in items:
        props = item["properties"]
        assert props["pivotmap:model_name"] == MODEL
        assert props["pivotmap:model_version"] == version


@slow
def test_training_gathers_another_run_and_validates_on_all_of_it(region_a, tmp_path_factory):
    """train.include + train.holdout: region C (another seed: another place, labelled) sampled in
    its own folder; A's run trains on A's training pixels and is scored on every labelled pixel
    of C, under a validation key of its own (a champion scored on A's blocks is not compared)."""
    import pyarrow.parquet as pq

    if not _has_sample_stage():
        pytest.skip("no sample stage")
    root = tmp_path_factory.mktemp("region-c")
    _generate(root / "data", seed=7)
    c_out = root / "run"
    _run(_write(root / "c.yaml", {**_config("data", region_a["db"]), "name": "region-c"}),
         c_out, ("ingest", "pivot", "sample"))  # fmt: skip
    files = json.loads((c_out / "reports/sample.json").read_text())["files"]
    held = sum(
        int(np.sum(pq.read_table(f, columns=["split"]).column("split").to_numpy(False)
                   != "unlabelled"))
        for f in files
    )  # fmt: skip
    gathered = {"include": [str(c_out)], "holdout": str(c_out)}
    config = _write(
        region_a["root"] / "a-holdout.yaml", _config("data", region_a["db"], train=gathered)
    )

    code, summary = _cli(["train", "--config", str(config), "--out", str(region_a["root"] / "run")])

    assert code == 0, summary.get("error")
    assert summary["split"].startswith(f"run {c_out} held out whole")
    assert summary["n_test_pixels"] == held > 0
    assert summary["validation_key"] != region_a["train"]["validation_key"]
    assert summary["promoted"] is False and "different key" in summary["promotion_reason"]


@slow
def test_a_cube_gap_filled_otherwise_is_refused_before_any_map(region_b, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(region_b["out"], out)
    shutil.rmtree(out / "maps", ignore_errors=True)
    shutil.rmtree(out / "models", ignore_errors=True)
    raw = json.loads(json.dumps(region_b["raw"]))
    raw["pivot"] = {**raw.get("pivot", {}), "max_hold_days": 60}
    config = _write(
        region_b["config"].parent / "b-hold60.yaml", _relative(raw, "../inputs", "inputs")
    )
    _run(config, out, ("pivot",))

    code, summary = _cli(["predict", "--config", str(config), "--out", str(out)])

    assert code == 1
    error = summary["error"]
    assert "CubeMismatchError" in error
    assert "pivot.max_hold_days=30" in error and "this cube has 60" in error
    assert f"{MODEL} v" in error
    assert not list(out.glob("maps/*.npz"))  # stopped before any map was written


@slow
def test_a_region_is_mapped_on_the_calendar_the_model_learnt(region_b, tmp_path):
    """`predict.calendar_shift`: `auto` scores every candidate shift on the region's own cube;
    a fixed shift remaps every tile (another cache key) and the products say it: their version,
    `pivotmap:calendar_shift_days` and lineage."""
    out = tmp_path / "run"
    shutil.copytree(region_b["out"], out)
    for folder in ("maps", "models", "products", "state/predict", "reports/predict.json"):
        path = out / folder
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def predict(shift) -> dict:
        raw = json.loads(json.dumps(region_b["raw"]))
        raw["predict"] = {**raw["predict"], "calendar_shift": shift}
        config = _write(
            region_b["config"].parent / f"b-shift-{shift}.yaml",
            _relative(raw, "../inputs", "inputs"),
        )
        return _run(config, out, ("predict", "publish"))

    auto = predict("auto")
    found = auto["predict"]["calendar_shift"]
    scores = {int(k): v for k, v in found["distance_by_shift_days"].items()}
    assert found["method"] in ("auto",) and found["pixels"] > 100
    assert sorted(scores) == list(range(-30, 31, 5))  # a quarter of the 4-month series each way
    assert found["days"] == 0 or scores[found["days"]] == min(scores.values()) <= 1.0
    # the same conditions in another place: nothing to move (a poor match says so)
    assert found["days"] == 0, found
    before = {p.name: np.load(p)["classes"] for p in (out / "maps").glob("*.npz")}

    fixed = predict(-30)
    assert fixed["predict"]["calendar_shift"]["days"] == -30
    assert fixed["predict"]["calendar_shift"]["method"] == "fixed"
    assert fixed["predict"]["cache_key"].endswith("+shift-30d")
    assert len(fixed["predict"]["tiles"]) == TILES * TILES  # remapped, not skipped
    after = {p.name: np.load(p)["classes"] for p in (out / "maps").glob("*.npz")}
    if found["days"] != -30:
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert fixed["publish"]["version"].endswith("-s-30d")
    assert auto["publish"]["version"].endswith(f"-s{found['days']}d") == bool(found["days"])
    collection = Path(fixed["publish"]["collection"])
    items = [json.loads(p.read_text()) for p in collection.parent.rglob("*.json")]
    items = [i for i in items if i.get("type") == "Feature"]
    assert len(items) == TILES * TILES
    for item in items:
        assert item["properties"]["pivotmap:calendar_shift_days"] == -30
        assert "moved -30 days" in item["properties"]["processing:lineage"]


@slow
def test_a_model_uri_that_does_not_resolve_is_named(region_a, region_b, tmp_path):
    raw = json.loads(json.dumps(region_b["raw"]))
    raw["predict"]["model_uri"] = "models:/no-such-model@champion"
    config = _write(
        region_b["config"].parent / "b-missing.yaml", _relative(raw, "../inputs", "inputs")
    )

    code, summary = _cli(["predict", "--config", str(config), "--out", str(region_b["out"])])

    assert code == 1
    error = summary["error"]
    assert "models:/no-such-model@champion" in error
    assert str(region_a["db"]) in error  # the tracking URI it was looked up on
    assert "mlflow.tracking_uri" in error  # what to do


# ---------------------------------------------------------------------------- fast


def test_model_uri_forms_are_checked_when_the_config_loads() -> None:
    from pivotmap.config import PredictConfig
    from pivotmap.models.registry import parse_model_uri

    assert PredictConfig(model_uri="models:/pivotmap-demo@champion").model_uri
    assert parse_model_uri("models:/pivotmap-demo/3") == ("pivotmap-demo", None, "3")
    assert parse_model_uri("models:/pivotmap-demo@champion") == ("pivotmap-demo", "champion", None)
    for bad in ("pivotmap-demo@champion", "models:/x", "runs:/abc/model", "models:/x/latest"):
        with pytest.raises(ValueError, match="models:/<name>@<alias>"):
            PredictConfig(model_uri=bad)


def test_tracking_uris_in_messages_carry_no_credentials() -> None:
    from pivotmap.models.registry import redacted

    assert redacted("https://alice:s3cret@mlflow.example.org:5000/") == (
        "https://mlflow.example.org:5000/"
    )
    assert redacted("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_unresolved_uri_names_it_the_tracking_uri_and_what_to_do(tmp_path: Path) -> None:
    from pivotmap.models.registry import load_model

    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    with pytest.raises(LookupError) as err:
        load_model(tracking_uri=uri, model_uri="models:/pivotmap-x@champion")
    text = str(err.value)
    assert "models:/pivotmap-x@champion" in text and uri in text and "mlflow.tracking_uri" in text
    assert not (tmp_path / "none").exists()  # looking up creates no empty store


def test_cube_settings_check_names_the_setting_and_both_values() -> None:
    from pivotmap.models import cube_settings as cs
    from pivotmap.models.network import ModelSpec

    spec = ModelSpec(classes=(1, 2), modalities=("s2", "s1"))
    trained_on = {
        "gap_filling": "linear v1: linear in time",
        "gap_filling_method": "linear",
        "max_hold_days": 30,
        "age_cap_days": 366,
    }
    trained = cs.from_tags(cs.as_tags(cs.training_settings(cs.pivot_settings(trained_on), spec)))
    assert trained["pivot.method_version"] == "1" and trained["train.modalities"] == "s2,s1"
    variables = set(cs.model_variables(spec))
    cs.check_cube("m v1", trained, cs.pivot_settings(trained_on), variables)  # same cube: fine

    other = cs.pivot_settings({**trained_on, "max_hold_days": 60})
    with pytest.raises(cs.CubeMismatchError) as err:
        cs.check_cube("pivotmap-demo v2", trained, other, variables)
    assert str(err.value).startswith(
        "model pivotmap-demo v2 was trained on a cube with pivot.max_hold_days=30; this cube "
        "has 60: rebuild the pivot with the model's settings or train a model on this cube"
    )
    s2_only = {v for v in variables if not v.endswith(("VV", "VH", "age_s1"))}
    with pytest.raises(cs.CubeMismatchError, match="VV, VH, age_s1"):
        cs.check_cube("m v1", trained, cs.pivot_settings(trained_on), s2_only)


def test_a_copied_config_keeps_its_relative_paths(tmp_path: Path) -> None:
    """source.url, region.geojson and labels.* follow the config file to its new folder."""
    from pivotmap.config import load_run_config

    first = tmp_path / "first"
    raw = _config("data", tmp_path / "mlflow.db")
    raw["region"] = {"geojson": "data/region.geojson"}
    raw["labels"] = {
        "nomenclature": "data/labels/nomenclature.yaml",
        "url": "data/labels/lc.tif",
        "sources": [{"url": "data/labels/parcels.gpkg", "class_column": "code"}],
    }
    _write(first / "run.yaml", raw)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)

    config = load_run_config(copy / "run.yaml")

    assert config.source.url == str(copy / "data" / "catalog.json")
    assert config.region.geojson == str(copy / "data" / "region.geojson")
    assert config.labels is not None
    assert config.labels.url == str(copy / "data" / "labels" / "lc.tif")
    assert config.labels.nomenclature == str(copy / "data" / "labels" / "nomenclature.yaml")
    assert config.labels.sources[0].url == str(copy / "data" / "labels" / "parcels.gpkg")


def test_a_model_registered_before_cube_settings_is_used_with_a_warning(tmp_path) -> None:
    import logging

    from pivotmap.config import RunConfig
    from pivotmap.models.inference import check_cube_settings
    from pivotmap.models.registry import LoadedModel
    from pivotmap.tasks.workspace import Workspace

    config = RunConfig.model_validate(_config("data", tmp_path / "mlflow.db"))
    ws = Workspace.open(config, tmp_path / "run")
    old = LoadedModel(model=None, spec=None, info={"name": MODEL, "version": "1"}, tags={})  # type: ignore[arg-type]

    logger, seen = logging.getLogger("pivotmap.predict"), io.StringIO()
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)
    try:
        check_cube_settings(ws, old)  # no cube is even opened: nothing to compare
    finally:
        logger.removeHandler(handler)

    assert f"model {MODEL} v1 records no cube settings" in seen.getvalue()
