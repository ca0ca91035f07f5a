"""Deployment entrypoints (infra/prefect.yaml), and creating the global concurrency limits.

The stage flows take a `RunConfig` object; a deployment's parameters must be plain JSON that the
Prefect UI can edit. The flows here take a config *path* (relative to the worker's working
directory, the repository checkout), an output folder and a few switches, load the config with
`load_run_config` (same validation as the CLI) and call the stage flows as subflows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow

from pivotmap.runtime import CONCURRENCY_LIMITS


def _load(config_path: str, overrides: dict[str, Any] | None):
    from pivotmap.config import load_run_config
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()  # a deployment's flow run is an entry point, like the CLI

    return load_run_config(Path(config_path), overrides=overrides)


@flow(name="update", log_prints=False)
def update(
    config_path: str, out_dir: str, force: bool = False, overrides: dict[str, Any] | None = None
) -> dict:
    """Daily: ingest the new acquisitions and bring the pivot cube up to date."""
    from pivotmap.flows.ingest import ingest_flow
    from pivotmap.flows.pivot import pivot_flow

    config = _load(config_path, overrides)
    ingest = ingest_flow(config, out_dir, force=force)
    pivot = pivot_flow(config, out_dir, force=force)
    return {
        "ok": True,
        "config": config.name,
        "tiles": len(ingest.tiles),
        "cube": pivot.cube,
        "cube_version": pivot.cube_version,
        "mode": pivot.mode,
    }


@flow(name="train-model")
def train_model(config_path: str, out_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """On demand: train on the current pivot cube, register, promote only a better model."""
    from pivotmap.flows.train import train_flow

    return train_flow(_load(config_path, overrides), out_dir).to_dict()


@flow(name="map-production")
def map_production(
    config_path: str,
    out_dir: str,
    force: bool = False,
    train: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Quarterly: ingest → pivot → (train) → predict with @champion → publish."""
    from pivotmap.flows.produce import produce_flow

    config = _load(config_path, overrides)
    return produce_flow(config, out_dir, force=force, train=train).to_dict()


@flow(name="demo")
def demo(
    out_dir: str = "demo-out",
    seed: int = 42,
    tiles: int = 2,
    tile_size: int = 64,
    start: str = "2023-01-01",
    end: str = "2023-12-31",
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Generate a synthetic region of `tiles` × `tiles` tiles and produce its map end to end."""
    from pivotmap.flows.demo import prepare_demo
    from pivotmap.flows.produce import produce_flow
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()
    config, path = prepare_demo(Path(out_dir), seed, tiles, tile_size, start, end, overrides)
    logging.getLogger("pivotmap.deploy").info("demo config %s", path)
    return {"demo_config": str(path), **produce_flow(config, out_dir).to_dict()}


def ensure_concurrency_limits(limits: dict[str, int] | None = None) -> dict[str, int]:
    """Create or update the global concurrency limits on the configured Prefect API."""
    from prefect.client.orchestration import get_client

    limits = limits or CONCURRENCY_LIMITS
    with get_client(sync_client=True) as client:
        for name, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(name=name, limit=limit)
    return dict(limits)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["limits"]:
        sys.exit("usage: python -m pivotmap.flows.deploy limits")
    for name, limit in ensure_concurrency_limits().items():
        print(f"global concurrency limit {name}: {limit}")
