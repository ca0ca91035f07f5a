"""Monitoring at country scale (issue 18, point 6): progress log lines with rate, px/s and ETA
for the tile loops, failures logged as they arrive, the parent run's stages shown live, tile
tables that summarise instead of listing every tile, and a run report whose links resolve."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import pytest

from pivotmap import progress
from pivotmap.progress import Rate, StageProgress, item_pixels, track
from pivotmap.results import IngestResult, PredictResult


@dataclass(frozen=True)
class FakeJob:
    """Shaped like models.inference.TileJob: a tile's row and column spans."""

    tile_id: str
    rows: tuple[int, int]
    cols: tuple[int, int]


def _jobs(n: int, edge: int = 100) -> list[FakeJob]:
    return [FakeJob(f"T{i}", (0, edge), (0, edge)) for i in range(n)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def caplog():
    """The records of the `pivotmap` loggers (Prefect's logging set-up keeps them from
    pytest's own capture)."""
    handler, logger = _Records(), logging.getLogger("pivotmap")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress ")]


def test_a_long_loop_logs_done_total_px_per_s_and_eta_not_one_line_per_tile(caplog):
    jobs = _jobs(1000)
    assert list(track(jobs, "predict")) == jobs
    lines = _progress_lines(caplog)
    # every tenth of a long loop (and every LOG_EVERY_S seconds): 10 lines for 1000 tiles
    assert len(lines) == 10, lines
    assert "stage=predict done=100 total=1000 percent=10.0" in lines[0]
    assert "px_per_s=" in lines[0] and "eta=" in lines[0] and "eta=?" not in lines[0]
    assert "done=1000 total=1000 percent=100.0" in lines[-1] and 'eta="0 s"' in lines[-1]


def test_a_slow_loop_logs_every_few_seconds_and_closes_with_a_last_line(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    for _ in track(_jobs(4, edge=10), "ingest s2"):
        time.sleep(0.06)
    lines = _progress_lines(caplog)
    # one line per tile, as each took longer than LOG_EVERY_S
    done = [re.search(r"done=\d+", line)[0] for line in lines]
    assert done == ["done=1", "done=2", "done=3", "done=4"]
    assert all('stage="ingest s2"' in line for line in lines)


def test_a_short_loop_stays_out_of_the_log(caplog):
    assert list(track(range(5), "pivot", total=5)) == list(range(5))
    assert _progress_lines(caplog) == []


def test_rate_figures_and_summary():
    rate = Rate("predict", 10, started=time.monotonic() - 20.0)
    for _ in range(4):
        rate.step(1_000_000)
    fields = rate.fields()
    assert fields["done"] == 4 and fields["total"] == 10 and fields["percent"] == 40.0
    assert 190_000 < fields["px_per_s"] < 210_000
    assert fields["eta"] == "30 s"
    assert rate.summary().startswith("4/10 · 200.0 kpx/s · ETA 30 s")


def test_item_pixels_reads_the_steps_of_the_tile_loops():
    from pivotmap.config import RunConfig
    from pivotmap.flows.demo import demo_config_dict
    from pivotmap.tasks.ingest import batches
    from pivotmap.tasks.workspace import Workspace

    assert item_pixels(FakeJob("T", (10, 74), (0, 32))) == 64 * 32
    assert item_pixels((3, {"tile": "T", "pixels": 99})) == 99  # map_tiles' (index, result)
    assert item_pixels(object()) is None
    ws = Workspace.open(RunConfig.model_validate(demo_config_dict()), "/tmp/unused")
    tiles = ws.tiles()
    plan = batches(tiles, n_dates=10, n_vars=10)
    size = ws.config.grid.tile_size
    assert sum(item_pixels(batch) for batch in plan) == len(tiles) * size * size


def test_failed_dask_futures_are_logged_as_they_arrive(caplog):
    from distributed import Client, as_completed

    def job(i: int) -> dict:
        if i == 2:
            raise RuntimeError("tile E0002 unreadable")
        return {"tile": f"T{i}", "pixels": 100}

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        futures = c.map(job, range(4), pure=False)
        failed = [
            f for f in track(as_completed(futures), "predict", total=4) if f.status == "error"
        ]
    assert len(failed) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("progress.failed" in w and "tile E0002 unreadable" in w for w in warnings)
    last = _progress_lines(caplog)[-1]  # a loop with a failure always ends with its line
    assert "done=4 total=4" in last and "failed=1" in last


def test_stage_progress_logs_each_stage_with_its_time(caplog):
    stages = StageProgress("demo", ["ingest", "pivot", "publish"])
    assert stages.run_stage("ingest", lambda: 1) == 1
    with pytest.raises(ValueError):
        stages.run_stage("pivot", lambda: (_ for _ in ()).throw(ValueError("bad cube")))
    text = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]
    assert text[0].startswith("stage run=demo stage=ingest status=done step=1/3 elapsed=")
    assert "run_elapsed=" in text[0]
    assert "stage=pivot status=failed" in text[1] and "error=ValueError" in text[1]
    table = stages.markdown()
    assert "| 1 | ingest | done |" in table and "| 2 | pivot | failed |" in table
    assert "| 3 | publish | waiting | |" in table


def test_produce_plans_its_stages_from_the_config():
    from pivotmap.config import RunConfig
    from pivotmap.flows.demo import demo_config_dict
    from pivotmap.flows.produce import planned_stages

    config = RunConfig.model_validate(demo_config_dict())
    assert planned_stages(config)[:4] == ["ingest", "pivot", "sample", "train"]
    assert planned_stages(config)[-1] == "publish"
    assert "train" not in planned_stages(config, train=False)


# ---------------------------------------------------------------------------- tile tables
def _many_tiles(n: int, reused: int, failed: int) -> list:
    written = [
        {"tile": f"T{i:05d}", "read_failures": [{"item": "S2_x", "reason": "HTTP 500"}]}
        if i < failed else {"tile": f"T{i:05d}", "read_failures": []}
        for i in range(n - reused)
    ]  # fmt: skip
    ingest = IngestResult.model_validate({
        "tiles": [f"T{i:05d}" for i in range(n)], "duration_s": 1.0,
        "modalities": {"s2": {
            "collection": "c", "items_found": 1, "items_used": 1, "dates": 1, "skipped_items": [],
            "item_ids": ["a"], "tiles_written": written, "cache_key": "k", "cube": "/x",
            "tiles_already_done": [f"T{i:05d}" for i in range(n - reused, n)],
            "tiles_without_data": [{"tile": "T00010", "reason": "no valid S2 observation"}],
        }},
    })  # fmt: skip
    predict = PredictResult.model_validate({
        "model": {"name": "m", "version": "1", "run_id": "r", "uri": "models:/m/1"},
        "device": "cpu", "tiles": [{"tile": f"T{i:05d}", "pixels": 1} for i in range(n)],
        "tiles_already_done": [], "cache_key": "m/1@c", "pixels": n, "px_per_s": 1.0,
        "duration_s": 1.0, "peak_rss_mb_per_worker": 1.0,
    })  # fmt: skip
    return [ingest, predict]


def test_tile_table_counts_per_stage_and_lists_only_tiles_not_written_capped():
    from pivotmap.flows.report import tile_status_markdown

    text = tile_status_markdown(_many_tiles(50_000, reused=30_000, failed=3), limit=100)
    assert "| ingest-s2 | 50000 | 19996 | 30000 | 3 | 1 |" in text
    assert "| predict | 50000 | 50000 | 0 | 0 | 0 |" in text
    listed = [line for line in text.splitlines() if line.startswith("| ingest-s2 | T")]
    assert len(listed) == 100  # never 50 000 rows
    assert listed[0].startswith("| ingest-s2 | T00000 | failed | 1 item reads failed")
    assert "| ingest-s2 | T00010 | no data | no valid S2 observation |" in text
    assert "29904 more tiles not written in this run are not listed" in text
    assert len(text) < 20_000
    clean = tile_status_markdown(_many_tiles(4, reused=0, failed=0))
    assert "Every tile was written in this run." in clean


def test_skipped_items_table_is_capped():
    from pivotmap.flows.ingest import skipped_item_rows

    [ingest, _] = _many_tiles(4, 0, 0)
    modality = ingest.modalities["s2"].model_copy(
        update={
            "skipped_items": [{"item": f"i{k}", "reason": "cloudy"} for k in range(500)]
            + [{"item": "bad", "reason": "HTTP 500", "stage": "read"}]
        }  # fmt: skip
    )
    rows = skipped_item_rows(ingest.model_copy(update={"modalities": {"s2": modality}}), 50)
    assert len(rows) == 51 and rows[0]["item"] == "bad"  # failed reads first
    assert rows[-1]["item"] == "… 451 more" and "reports/ingest.json" in rows[-1]["reason"]


# ---------------------------------------------------------------------------- in a flow run
@pytest.mark.slow
def test_progress_artifacts_move_during_the_loop_and_the_stage(prefect_server, monkeypatch):
    """A real Prefect API: the tile loop's artifact and the parent run's stage artifact are
    read back while the flow runs, not only at its end."""
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    monkeypatch.setattr(progress, "UPDATE_EVERY_S", 0.0)

    def progress_artifacts() -> dict[str, float]:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
            )
        return {a.description: float(a.data) for a in found}

    seen: dict[str, dict] = {}

    @flow(name="monitoring-probe")
    def probe() -> None:
        stages = StageProgress("probe", ["predict", "publish"], key="stages-probe")

        def predict() -> None:
            for i, _ in enumerate(track(_jobs(4), "probe predict")):
                if i == 2:  # third tile: two finished
                    seen["tiles"] = progress_artifacts()
                    seen["stages"] = progress_artifacts()

        stages.run_stage("predict", predict)
        seen["between"] = progress_artifacts()
        stages.run_stage("publish", lambda: None)

    probe()
    during = {k: v for k, v in seen["tiles"].items() if k.startswith("probe predict")}
    assert list(during.values()) == [50.0], during  # 2 of 4 tiles, while the loop ran
    assert any(k.startswith("probe predict: 2/4 · ") and "px/s" in k for k in during)
    running = [k for k in seen["stages"] if k.startswith("probe: running predict (1/2)")]
    assert running and seen["stages"][running[0]] == 0.0
    between = [v for k, v in seen["between"].items() if "predict done; next publish" in k]
    assert between == [50.0]
    final = progress_artifacts()
    assert any(k.startswith("probe: all stages done") and v == 100.0 for k, v in final.items())
    with get_client(sync_client=True) as client:
        table = client.read_latest_artifacts()
    stages_md = next(a for a in table if a.key == "stages-probe")
    assert "| 2 | publish | done |" in stages_md.data


def test_produce_passes_force_to_every_stage_that_takes_it(tmp_path, monkeypatch):
    """`produce --force` redoes the finished tiles of ingest, pivot, sample and predict (predict
    was left out); train and publish take no force (always new). The stages are recorded, not
    run: this is the wiring of produce_flow."""
    from pivotmap.config import RunConfig
    from pivotmap.flows import produce
    from pivotmap.flows.demo import demo_config_dict

    called: dict[str, dict] = {}

    def recorder(name):
        def stage(config, root, **kwargs):
            called[name] = kwargs

        return stage

    for name in ("ingest", "pivot", "sample", "train", "predict", "publish"):
        monkeypatch.setattr(produce, f"{name}_flow", recorder(name))
    monkeypatch.setattr(produce, "concept_maps_flow", recorder("concept"))
    monkeypatch.setattr(produce, "explain_flow", recorder("explain"))
    monkeypatch.setattr(produce, "run_summary", lambda ws, stages, seconds: stages)
    monkeypatch.setattr(produce, "publish_run_report", lambda ws, run, stages: None)
    config = RunConfig.model_validate(demo_config_dict())
    produce.produce_flow.fn(config, str(tmp_path / "run"), force=True)
    forced = {name for name, kwargs in called.items() if kwargs.get("force")}
    assert forced == {"ingest", "pivot", "sample", "predict"}
    assert {"train", "publish"} <= set(called)
