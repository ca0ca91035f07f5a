"""`pivotmap check` and the checks every stage command runs first: every input a run needs is
validated in seconds, before any pixel is read, and each failure names the input and what to do."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pivotmap.config import load_run_config
from pivotmap.flows.check import check, checks_text
from pivotmap.flows.cli import main
from tests.small_runs import generate_small_region, small_config
from tests.stac_api import serve_catalog


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("check-region")
    generate_small_region(folder / "data")
    return folder


def _config(region: Path, tmp_path: Path, *layers: dict) -> Path:
    raw = small_config(str(region / "data"), tmp_path / "mlflow.db", *layers)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _rows(text: str) -> dict[str, str]:
    """check name -> status, from the table on stderr."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[0] in {"OK", "FAILED", "SKIPPED"}:
            rows[parts[1]] = parts[0]
    return rows


def test_a_good_config_passes_in_seconds_and_creates_nothing(region, tmp_path, capsys):
    out = tmp_path / "not-yet" / "out"
    started = time.monotonic()
    code = main(["check", "--config", str(_config(region, tmp_path)), "--out", str(out)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 0, err
    assert _rows(err) == {
        "region": "OK", "catalogue": "OK", "labels": "OK", "output": "OK", "model": "SKIPPED",
    }  # fmt: skip
    assert "sentinel-2-l2a: 25 items" in err and "4 tiles of 32 px" in err
    assert "4 passed, 0 failed, 1 skipped" in err
    assert elapsed < 15
    assert not (tmp_path / "not-yet").exists()  # the probe folder is removed again


def test_every_bad_input_is_listed_with_what_to_do(region, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = _config(
        region, tmp_path,
        {"source": {"url": str(tmp_path / "nowhere" / "catalog.json")}},
        {"labels": {"url": str(tmp_path / "missing.tif")}},
    )  # fmt: skip
    code = main(["check", "--config", str(config), "--out", str(blocker / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    rows = _rows(captured.err)
    assert rows == {
        "region": "OK", "catalogue": "FAILED", "labels": "FAILED", "output": "FAILED",
        "model": "SKIPPED",
    }  # fmt: skip
    assert "STAC catalogue not found" in captured.err and "check `source.url`" in captured.err
    assert "missing.tif" in captured.err
    assert f"cannot write to {blocker / 'out'}" in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("pivotmap: error:")]
    assert len(errors) == 1 and "check catalogue, labels, output failed" in errors[0]
    assert "Traceback" not in captured.err


def test_unknown_collection_and_unresolvable_model(region, tmp_path):
    config = load_run_config(
        _config(
            region,
            tmp_path,
            {"source": {"s1_collection": "sentinel-1-grd"}},
            {"predict": {"model_uri": "models:/no-such-model@champion"}},
        )  # fmt: skip
    )
    rows = {c.name: c for c in check(config, str(tmp_path / "out"))}
    assert (
        rows["catalogue"].failed
        and "'sentinel-1-grd' is not in catalogue" in rows["catalogue"].detail
    )
    assert "labels" not in rows  # a registered model from elsewhere maps with no labels here
    assert rows["model"].failed and "models:/no-such-model@champion" in rows["model"].detail
    assert "does not resolve" in rows["model"].detail


def test_a_stac_api_is_asked_for_its_collections(region, tmp_path):
    with serve_catalog(region / "data" / "catalog.json") as url:
        good = load_run_config(
            _config(region, tmp_path, {"source": {"kind": "api", "url": str(url)}})
        )
        ok = {c.name: c for c in check(good, None, stage="ingest")}
        bad = load_run_config(
            _config(region, tmp_path, {"source": {"kind": "api", "url": str(url),
                                                   "s2_collection": "sentinel-2-c1-l2a"}})
        )  # fmt: skip
        failed = {c.name: c for c in check(bad, None, stage="ingest")}
    assert ok["catalogue"].status == "ok", ok["catalogue"].detail
    assert ok["output"].status == "skipped"
    assert failed["catalogue"].failed
    assert "'sentinel-2-c1-l2a' not found in STAC API" in failed["catalogue"].detail


def test_a_stage_on_a_fresh_folder_says_which_stage_to_run_first(region, tmp_path, capsys):
    started = time.monotonic()
    code = main(["train", "--config", str(_config(region, tmp_path)), "--out", str(tmp_path / "o")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("pivotmap: error:")]
    assert len(errors) == 1 and "run the 'pivot' stage first" in errors[0]
    assert "FileNotFoundError" not in err and "Traceback" not in err
    assert elapsed < 15  # refused before any flow (and its Prefect server) starts


def test_checks_text_counts_each_outcome(region, tmp_path):
    config = load_run_config(_config(region, tmp_path))
    text = checks_text(check(config, None, stage="publish"), "title")
    assert text.splitlines()[0] == "title"
    assert "SKIPPED output" in text and text.endswith("0 passed, 0 failed, 2 skipped")
