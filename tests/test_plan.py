"""`pivotmap plan`: the cost of a run from its config and item metadata, without reading a pixel."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import shapely
import yaml
from odc.geo.geom import Geometry

from pivotmap.config import load_run_config
from pivotmap.flows.cli import main
from pivotmap.flows.demo import prepare_demo
from pivotmap.flows.plan import plan, plan_text
from pivotmap.rates import RATES, Rate, load_rates, rates_to_json
from pivotmap.tasks.grid import GridSpec, RegionError
from pivotmap.tasks.plan import tile_cover
from pivotmap.tasks.region import tiles_lonlat
from pivotmap.tasks.stac_source import SourceError, item_source
from pivotmap.tasks.workspace import Workspace

START, END = "2023-05-01", "2023-06-30"  # 61 days: S2 every 5 days, S1 every 6
PIXEL_FIGURES = ("ingest", "pivot", "predict", "publish")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A 2 × 2 tiles of 32 px synthetic region and its config; no stage is run."""
    out = tmp_path_factory.mktemp("plan")
    _, path = prepare_demo(out, 7, 2, 32, START, END)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable(path: Path):
    url = f"http://127.0.0.1:{_free_port()}/stac"
    source = {"kind": "api", "url": url, "max_retries": 0, "timeout_s": 2}
    return load_run_config(path, {"source": source}), url


def test_tiles_pixels_and_items_are_what_the_run_uses(demo):
    config = load_run_config(demo)
    tiles = Workspace(root=str(demo.parent / "unused"), config=config).tiles()
    summary = plan(config)
    assert summary["tiles"] == len(tiles) == 4
    assert summary["pixels"] == len(tiles) * 32 * 32
    assert summary["days"] == 61
    source = item_source(config.source)
    for m, collection in (("s2", "sentinel-2-l2a"), ("s1", "sentinel-1-rtc")):
        items = source.search(collection, tiles_lonlat(tiles), config.period.start,
                              config.period.end)  # fmt: skip
        assert summary["items"][m]["items"] == len(items) == math.ceil(61 / (5 if m == "s2" else 6))
        assert summary["items"][m]["observations_per_pixel"] == pytest.approx(len(items))
    assert summary["bytes"]["read_s2"]["unit"] == "bytes (file:size)"
    for stage in ("ingest", "pivot", "sample", "train", "predict", "publish"):
        c = summary["stages"][stage]
        assert c["core_hours"] > 0 and c["cpu"]["source"] == RATES[stage].source
    assert summary["stages"]["predict"]["gpu_hours"] is None  # no GPU rate measured yet
    assert summary["total"]["core_hours_not_measured"] == []
    text = plan_text(summary)
    assert "not measured" in text and RATES["pivot"].source in text


def test_no_pixel_is_read(tmp_path, demo):
    _, path = prepare_demo(tmp_path / "copy", 7, 2, 32, START, END)
    cogs = list((tmp_path / "copy" / "data").rglob("*.tif"))
    assert len(cogs) > 100
    for cog in cogs:
        cog.unlink()
    summary, reference = plan(load_run_config(path)), plan(load_run_config(demo))
    assert summary["bytes"] == reference["bytes"] and summary["stages"] == reference["stages"]


def test_pixel_proportional_figures_scale_linearly(demo):
    config = load_run_config(demo)
    x0, y0, x1, y1 = config.region.bbox
    big = load_run_config(demo, {"region": {"bbox": [x0, y0, 2 * x1 - x0, 2 * y1 - y0]}})
    for offline in (True, False):
        small, large = plan(config, offline), plan(big, offline)
        assert large["pixels"] == 4 * small["pixels"] and large["tiles"] == 16
        scaled = ["pivot", "predict", "publish"] + (["ingest"] if offline else [])
        for stage in scaled:
            ratio = large["stages"][stage]["core_hours"] / small["stages"][stage]["core_hours"]
            assert ratio == pytest.approx(4)
        assert large["stages"]["train"] == small["stages"]["train"]  # set by train.*, not area
        ratio = large["bytes"]["pivot_cube"]["value"] / small["bytes"]["pivot_cube"]["value"]
        assert ratio == pytest.approx(4)
    offline_small, offline_large = plan(config, True), plan(big, True)
    for key in ("obs_cube_s2", "obs_cube_s1", "read_s2", "products"):
        ratio = offline_large["bytes"][key]["value"] / offline_small["bytes"][key]["value"]
        assert ratio == pytest.approx(4)


@pytest.mark.parametrize(
    "shape",
    [
        shapely.Point(500_700, 5_630_900).buffer(2_300),  # a round region
        shapely.Polygon([(500_000, 5_630_000), (504_000, 5_630_000), (500_320, 5_633_000)]),
        shapely.box(500_000, 5_630_000, 501_600, 5_632_240),  # edges on tile lines
        shapely.box(500_013, 5_630_007, 501_611, 5_632_251),
    ],
)
def test_tile_count_matches_the_grid(shape):
    spec = GridSpec(crs="EPSG:32631", resolution=10, tile_size=16, origin_x=500_000,
                    origin_y=5_630_000)  # fmt: skip
    geom = Geometry(shape, crs="EPSG:32631")
    tiles = spec.tiles_for_geometry(geom)
    cover = tile_cover(spec, geom)
    assert cover.tiles == len(tiles) and cover.pixels == len(tiles) * 16 * 16
    union = shapely.union_all([t.footprint.geom for t in tiles])
    assert cover.footprint.geom.symmetric_difference(union).area == pytest.approx(0, abs=1e-3)
    lonlat = Geometry(shape, crs="EPSG:32631").to_crs("EPSG:4326")  # another CRS: not a box
    assert tile_cover(spec, lonlat).tiles == len(spec.tiles_for_geometry(lonlat))


def test_tile_count_honours_the_grid_extent():
    spec = GridSpec(crs="EPSG:32631", resolution=10, tile_size=16, origin_x=500_000,
                    origin_y=5_630_000, extent=(500_000, 5_630_000, 500_800, 5_630_800))  # fmt: skip
    inside = Geometry(shapely.box(499_000, 5_629_000, 501_000, 5_631_000), crs="EPSG:32631")
    assert tile_cover(spec, inside).tiles == len(spec.tiles_for_geometry(inside)) == 25
    outside = Geometry(shapely.box(600_000, 5_700_000, 600_100, 5_700_100), crs="EPSG:32631")
    with pytest.raises(RegionError, match="outside the grid's valid extent"):
        tile_cover(spec, outside)


def test_unreachable_catalogue_is_named_and_offline_skips_it(demo):
    config, url = _unreachable(demo)
    with pytest.raises(SourceError, match="--offline") as info:
        plan(config)
    assert url in str(info.value)
    missing = load_run_config(demo, {"source": {"url": str(demo.parent / "nowhere.json")}})
    with pytest.raises(SourceError, match="nowhere.json"):
        plan(missing)
    summary = plan(config, offline=True)
    assert summary["items"]["s2"]["dates"] == 13 and summary["items"]["s1"]["dates"] == 11
    assert "offline" in summary["items"]["s2"]["basis"]
    assert summary["bytes"]["read_s2"]["estimated"] is True
    assert summary["bytes"]["read_s2"]["source"] == RATES["input_bytes_s2"].source


def test_rates_file_overrides_and_gives_gpu_hours(tmp_path, demo):
    measured = {**RATES, "predict_gpu": Rate(1e8, "pixel-days per GPU-second", "test run")}
    path = tmp_path / "rates.json"
    path.write_text(rates_to_json(measured))
    assert load_rates(path) == measured
    summary = plan(load_run_config(demo), offline=True, rates_file=str(path))
    pixel_days = summary["pixels"] * summary["days"]
    assert summary["stages"]["predict"]["gpu_hours"] == pytest.approx(pixel_days / 1e8 / 3600)
    assert summary["total"]["gpu_hours"] == summary["stages"]["predict"]["gpu_hours"]
    (tmp_path / "bad.json").write_text('{"predict": 3}')
    with pytest.raises(ValueError, match="bad.json"):
        load_rates(tmp_path / "bad.json")


def test_cli_plan_prints_a_table_and_one_json_line(demo):
    exe = Path(sys.executable).with_name("pivotmap")
    result = subprocess.run(
        [str(exe), "plan", "--config", str(demo), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["tiles"] == 4 and summary["command"] == "plan"
    assert "pivot core-h" in result.stderr and "[1] " in result.stderr


def test_cli_plan_error_is_one_line(demo, capsys):
    raw = yaml.safe_load(demo.read_text())
    url = f"http://127.0.0.1:{_free_port()}/stac"
    raw["source"] |= {"kind": "api", "url": url, "max_retries": 0, "timeout_s": 2}
    bad = demo.parent / "unreachable.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["plan", "--config", str(bad), "--json"]) == 1
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["ok"] is False and url in answer["error"] and "--offline" in answer["error"]
    assert main(["plan", "--config", str(bad), "--offline"]) == 0
    assert "offline: assumed revisit" in capsys.readouterr().out
