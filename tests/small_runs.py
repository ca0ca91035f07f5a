"""The small generated region that chain tests run through the CLI, and that CLI runner.

2 × 2 tiles of 32 px over four spring months, a few epochs, no pretraining, baseline or
explanation layer: what these tests check is the chain (storage, cluster, registry), not the
accuracy. Each test adds its own layer (its MLflow store, a Dask address, a model URI).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

TILES, TILE_SIZE = 2, 32  # 640 m × 640 m: four pivot blocks, four predict tiles
PERIOD = ("2023-03-01", "2023-06-30")
FAST = {
    "train": {"epochs": 3, "pretrain_epochs": 0, "baseline_trees": 0},
    "concept": {"steps": 10, "max_pixels": 100},
    "predict": {"workers": 1},
    "explain": {"enabled": False},
}


def small_config(data_dir: str, tracking_db: Path, *layers: dict) -> dict:
    """The demo config of the region generated under DATA_DIR (relative to the config file),
    cut to TILES × TILE_SIZE and PERIOD, with its own MLflow store, then `layers` merged in."""
    from pivotmap.config import deep_merge
    from pivotmap.flows.demo import demo_config_dict

    raw = demo_config_dict(data_dir)
    x0, y0 = raw["grid"]["origin_x"], raw["grid"]["origin_y"]
    edge = TILES * TILE_SIZE * raw["grid"]["resolution"]
    size = {
        "grid": {"tile_size": TILE_SIZE},
        "region": {"bbox": [x0, y0, x0 + edge, y0 + edge]},
        "period": {"start": PERIOD[0], "end": PERIOD[1]},
        "mlflow": {"tracking_uri": f"sqlite:///{tracking_db}"},
    }
    merged = deep_merge(raw, {**size, **FAST})
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def write_small_config(folder: Path, name: str, tracking_db: Path, *layers: dict) -> Path:
    """`small_config` of the region under FOLDER/data, written as FOLDER/NAME."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(small_config("data", tracking_db, *layers), sort_keys=False))
    return path


def cli(argv: list[str]) -> tuple[int, dict, str]:
    """Run `pivotmap ARGV --json` in this process: (exit code, its JSON summary, its stdout).
    Module fixtures read stdout by hand (capsys is function-scoped)."""
    from pivotmap.flows.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main([*argv, "--json"])
    lines = buffer.getvalue().strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return code, summary, buffer.getvalue()


def generate_small_region(folder: Path, seed: int = 42) -> Path:
    """The synthetic region of TILES × TILE_SIZE over PERIOD, generated into FOLDER."""
    from pivotmap.tasks.synthetic import generate_demo_region

    generate_demo_region(
        folder, seed=seed, tiles_x=TILES, tiles_y=TILES, tile_size=TILE_SIZE,
        start=PERIOD[0], end=PERIOD[1],
    )  # fmt: skip
    return folder
