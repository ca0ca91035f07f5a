"""Stage results: typed, frozen, a JSON round-trip, read by later stages through their type."""

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from pivotmap.config import RunConfig
from pivotmap.flows.demo import demo_config_dict
from pivotmap.results import (
    STAGE_RESULTS,
    IngestResult,
    ModalityIngest,
    ModelRef,
    PivotResult,
    PredictResult,
    StageNotRun,
)
from pivotmap.tasks.workspace import Workspace


def _ingest() -> IngestResult:
    s2 = ModalityIngest(
        collection="sentinel-2-l2a", items_found=3, items_used=2, item_ids=["a", "b"],
        skipped_items=[{"item": "c", "reason": "cloudy"}], dates=2,
        tiles_written=[{"tile": "E0N0", "valid_fraction": 0.5}], tiles_already_done=[],
        cache_key="k", cube="cube/obs_s2.zarr",
    )  # fmt: skip
    return IngestResult(tiles=["E0N0"], modalities={"s2": s2}, duration_s=1.5)


def _workspace(tmp_path: Path) -> Workspace:
    config = RunConfig.model_validate(demo_config_dict(str(tmp_path / "data")))
    return Workspace.open(config, tmp_path / "run")


def test_every_stage_has_a_result_type():
    assert set(STAGE_RESULTS) == {
        "ingest", "pivot", "sample", "train", "predict", "concept", "explain", "publish"
    }  # fmt: skip


def test_a_result_round_trips_through_json_and_is_frozen():
    result = _ingest()
    again = IngestResult.from_json(result.to_json())
    assert again == result and again.modalities["s2"].item_ids == ["a", "b"]
    assert result.to_dict()["modalities"]["s2"]["skipped_items"][0]["reason"] == "cloudy"
    with pytest.raises(pydantic.ValidationError):
        result.duration_s = 2.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):  # an unknown key is refused, not kept
        IngestResult.model_validate({**result.to_dict(), "surprise": 1})


def test_a_later_stage_reads_an_earlier_result_through_its_type(tmp_path):
    ws = _workspace(tmp_path)
    url = ws.write_result(_ingest())
    assert url.endswith("reports/ingest.json") and Path(url).is_file()
    assert ws.read_result(IngestResult) == _ingest()
    assert ws.find_result(PivotResult) is None


def test_a_missing_stage_is_named_with_the_command_to_run(tmp_path):
    ws = _workspace(tmp_path)
    with pytest.raises(StageNotRun, match=r"run the 'pivot' stage first.*pivotmap pivot"):
        ws.read_result(PivotResult)


def test_a_result_of_another_shape_is_refused(tmp_path):
    ws = _workspace(tmp_path)
    ws.write_result(_ingest())
    (Path(ws.root) / "reports" / "predict.json").write_text(_ingest().to_json())
    with pytest.raises(pydantic.ValidationError):
        ws.read_result(PredictResult)
    ref = ModelRef(name="m", version="1", run_id="r", uri="models:/m/1")
    assert ModelRef.model_validate_json(ref.model_dump_json()) == ref


@pytest.mark.slow  # the flow starts a temporary Prefect server
def test_cli_stage_on_a_fresh_folder_says_which_stage_to_run(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(demo_config_dict(str(tmp_path / "data"))))
    exe = Path(sys.executable).with_name("pivotmap")
    result = subprocess.run(
        [str(exe), "pivot", "--config", str(config), "--out", str(tmp_path / "fresh")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("pivotmap: error:")]
    assert result.returncode == 1 and len(errors) == 1
    assert "StageNotRun" in errors[0] and "run the 'ingest' stage first" in errors[0]


def test_a_run_folder_on_object_storage_needs_a_tracking_uri(tmp_path):
    from pivotmap.models.registry import tracking_uri_for

    with pytest.raises(ValueError, match=r"`mlflow.tracking_uri` must be set.*s3://maps/run"):
        tracking_uri_for("s3://maps/run")
    assert tracking_uri_for("s3://maps/run", "http://mlflow:5000") == "http://mlflow:5000"
    local = tracking_uri_for(str(tmp_path / "run"))
    assert local == f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}"
