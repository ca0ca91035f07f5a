"""The command line: fast help, one-line errors naming the input, JSON on the last stdout line."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pivotmap.flows.cli import main
from pivotmap.flows.demo import demo_config_dict

CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "configs"


def _pivotmap(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("pivotmap")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def test_help_is_fast():
    started = time.monotonic()
    result = _pivotmap("--help")
    assert result.returncode == 0 and "produce" in result.stdout
    assert time.monotonic() - started < 5  # no Prefect/torch/MLflow import at start-up


def _config(tmp_path: Path, **changes) -> Path:
    raw = demo_config_dict(str(tmp_path / "data"))
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_missing_catalogue_exits_non_zero_naming_it(tmp_path):
    result = _pivotmap(
        "ingest", "--config", str(_config(tmp_path)), "--out", str(tmp_path / "o"), "--json"
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("pivotmap: error:")]
    assert (
        len(errors) == 1
        and "STAC catalogue not found" in errors[0]
        and "data/catalog.json" in errors[0]
    )
    assert _last_json(result.stdout)["ok"] is False


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"source": {"s2_collection": "sentinel-2-c1-l2a"}},
            "'sentinel-2-c1-l2a' is not in catalogue",
        ),
        ({"period": {"start": "2021-01-01", "end": "2021-12-31"}}, "no items of 'sentinel-2-l2a'"),
        ({"region": {"bbox": [601360, 5729040, 602000, 5729680]}}, "no items of 'sentinel-2-l2a'"),
    ],
)
def test_unknown_collection_and_empty_period(
    flanders, tmp_path, capsys, prefect_server, changes, expected
):
    raw = yaml.safe_load((CONFIGS / "flanders.yaml").read_text())
    raw["source"]["url"] = str(flanders / "catalog.json")
    raw["labels"] = {
        "url": str(flanders / "labels/lc.tif"),
        "nomenclature": str(CONFIGS / "flanders-nomenclature.yaml"),
    }
    raw.pop("publish")
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["ingest", "--config", str(path), "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert expected in _last_json(captured.out)["error"]
    # found by the checks before the stage starts: their table, then the one error line
    assert "FAILED  catalogue" in captured.err or "FAILED" in captured.err
    assert "pivotmap: error: ChecksFailed: " in captured.err
    assert not (tmp_path / "o" / "cube").exists()  # nothing was read


def test_invalid_config_is_refused_before_any_work(tmp_path, capsys):
    path = _config(tmp_path, train={"epoch": 3})
    assert main(["produce", "--config", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "train.epoch: Extra inputs are not permitted" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_logged_errors_show_no_traceback_unless_debug():
    """Prefect logs every failed flow with its traceback; the terminal gets one line of it."""
    import io
    import logging

    from pivotmap.runtime import console_output

    stream = io.StringIO()
    terminal = logging.StreamHandler(stream)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root, log = logging.getLogger(), logging.getLogger("pivotmap.test-cli")
    root.addHandler(terminal)

    def failure() -> str:
        stream.seek(0)
        stream.truncate()
        try:
            raise ValueError("bad input named here")
        except ValueError:
            log.error("Encountered exception during execution", exc_info=True)
        return stream.getvalue()

    try:
        console_output(False)
        quiet = failure()
        console_output(True)
        loud = failure()
    finally:
        root.removeHandler(terminal)
        console_output(True)
    assert quiet == "ERROR Encountered exception during execution\n"
    assert "Traceback" in loud and "ValueError: bad input named here" in loud


def test_promote_moves_champion_by_hand_and_says_from_what(tmp_path, capsys):
    """A version kept out by the promotion rule (validated on other data) is made champion."""
    from pivotmap.models.network import ModelSpec, build_model
    from pivotmap.models.registry import log_and_register, resolve_model_version

    tracking, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "pivotmap-promote-test"
    spec = ModelSpec(classes=(1, 2), hidden=8, n_steps=4)
    for f1, key in ((0.6, "cube-a"), (0.9, "cube-b")):
        log_and_register(
            tracking_uri=tracking, artifact_root=None, experiment="test", model_name=name,
            model=build_model(spec), spec=spec, params={}, metrics={"macro_f1": f1},
            validation_key=key,
        )  # fmt: skip
    champion = f"models:/{name}@champion"
    assert resolve_model_version(tracking_uri=tracking, model_uri=champion)["version"] == "1"
    raw = demo_config_dict(str(tmp_path / "data"))
    raw |= {"mlflow": {"tracking_uri": tracking}, "train": {"model_name": name}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()

    assert main(["promote", "2", "--config", str(config), "--json"]) == 0
    captured = capsys.readouterr()
    assert _last_json(captured.out) | {"ok": True} == {
        "ok": True, "model": name, "previous": "1", "champion": "2", "uri": f"models:/{name}/2",
    }  # fmt: skip
    assert f"{name}@champion: v1 -> v2" in captured.err
    assert resolve_model_version(tracking_uri=tracking, model_uri=champion)["version"] == "2"

    assert main(["promote", "7", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "pivotmap: error: LookupError:" in err and "no version 7" in err
    assert resolve_model_version(tracking_uri=tracking, model_uri=champion)["version"] == "2"
