"""Deployment entrypoints (infra/prefect.yaml), and setting a Prefect server up for them.

The stage flows take a `RunConfig` object; a deployment's parameters must be plain JSON that the
Prefect UI can edit. The flows here take a config *path*, an output folder and a few switches,
load the config with `load_run_config` (same validation as the CLI) and call the stage flows as
subflows. The deployments name them by module path (`pivotmap.flows.deploy.update`), so a worker
runs the code of the pivotmap installed in its environment; no checkout is needed for the code.

Relative `config_path` and `out_dir` resolve against the worker's `PIVOTMAP_REPO`, else against
the checkout pivotmap is installed from in development mode (`pip install -e`); with neither, a
relative path is refused with what to do (an absolute path or URL always works).

`python -m pivotmap.flows.deploy deploy [--schedules-active]` is the one command that deploys
infra/prefect.yaml on a fresh server: it creates the work pools the file names (process pools,
only where missing), runs `prefect deploy --all` (whose build step creates the global
concurrency limits), and leaves new schedules paused unless asked, keeping the schedules that
were already active running through a re-deploy.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from pivotmap.runtime import CONCURRENCY_LIMITS

PREFECT_FILE = "infra/prefect.yaml"
BASE_ENV = "PIVOTMAP_REPO"  # the worker's folder for relative config_path / out_dir


# ---------------------------------------------------------------------------- paths on workers
def installed_checkout() -> Path | None:
    """The repository checkout pivotmap runs from (a development install), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / PREFECT_FILE).is_file() else None


def base_directory() -> Path | None:
    """Where relative deployment paths resolve: $PIVOTMAP_REPO, else the installed checkout."""
    named = os.environ.get(BASE_ENV)
    if named:
        base = Path(named).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(
                f"{BASE_ENV}={named} is not a folder on this worker: set it to the folder that "
                "relative config_path and out_dir parameters are relative to (or unset it)"
            )
        return base.resolve()
    return installed_checkout()


def resolve_path(value: str, parameter: str) -> str:
    """An absolute path or URL as is; a relative path against `base_directory()`."""
    if "://" in value or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if "://" not in value else value
    base = base_directory()
    if base is None:
        raise ValueError(
            f"{parameter}={value!r} is a relative path, and this worker has no folder to resolve "
            f"it in: pass an absolute path or URL, or start the worker with {BASE_ENV}=<folder> "
            "(e.g. the repository checkout holding infra/configs/)"
        )
    return str(base / value)


def run_directory() -> dict[str, str]:
    """Pull step (infra/prefect.yaml): run the flow in `base_directory()` when there is one;
    otherwise the worker's temporary folder, where relative parameters are refused."""
    base = base_directory()
    return {"directory": str(base)} if base else {}


def _load(config_path: str, overrides: dict[str, Any] | None):
    from pivotmap.config import load_run_config
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()  # a deployment's flow run is an entry point, like the CLI
    path = Path(resolve_path(config_path, "config_path"))
    if not path.is_file():
        raise FileNotFoundError(
            f"config_path {config_path!r}: no file at {path} on this worker; pass the path of a "
            f"run config there (relative paths resolve against {BASE_ENV} or the checkout)"
        )
    return load_run_config(path, overrides=overrides)


def _checked(config, out: str, stages: tuple[str | None, ...], train: bool = True) -> None:
    """The checks the CLI runs before a command (`flows.check`), run first in a deployed flow:
    a bad input fails the run in seconds with the failed checks named (and alerts), before any
    stage starts. `None` in `stages`: the checks of a whole run."""
    from pivotmap.flows.check import check, checks_text, require
    from pivotmap.runtime import run_logger

    for stage in stages:
        rows = check(config, out, stage, train=train)
        if any(r.failed for r in rows):
            run_logger("deploy").error(checks_text(rows, f"{config.name}: checks"))
        require(rows, f"{config.name} ({stage or 'whole run'}) cannot start")


# ---------------------------------------------------------------------------- entrypoints
@flow(name="update", log_prints=False)
def update(
    config_path: str, out_dir: str, force: bool = False, overrides: dict[str, Any] | None = None
) -> dict:
    """Daily: ingest the new acquisitions and bring the pivot cube up to date."""
    from pivotmap.flows.ingest import ingest_flow
    from pivotmap.flows.pivot import pivot_flow

    config, out = _load(config_path, overrides), resolve_path(out_dir, "out_dir")
    _checked(config, out, ("ingest",))
    ingest = ingest_flow(config, out, force=force)
    pivot = pivot_flow(config, out, force=force)
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

    config, out = _load(config_path, overrides), resolve_path(out_dir, "out_dir")
    _checked(config, out, ("train",))
    return train_flow(config, out).to_dict()


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

    config, out = _load(config_path, overrides), resolve_path(out_dir, "out_dir")
    _checked(config, out, (None,), train=train)
    return produce_flow(config, out, force=force, train=train).to_dict()


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
    out = resolve_path(out_dir, "out_dir")
    config, path = prepare_demo(Path(out), seed, tiles, tile_size, start, end, overrides)
    logging.getLogger("pivotmap.deploy").info("demo config %s", path)
    return {"demo_config": str(path), **produce_flow(config, out).to_dict()}


# ---------------------------------------------------------------------------- server set-up
def ensure_concurrency_limits(limits: dict[str, int] | None = None) -> dict[str, int]:
    """Create or update the global concurrency limits on the configured Prefect API."""
    from prefect.client.orchestration import get_client

    limits = limits or CONCURRENCY_LIMITS
    with get_client(sync_client=True) as client:
        for name, limit in limits.items():
            client.upsert_global_concurrency_limit_by_name(name=name, limit=limit)
    return dict(limits)


def _deploy_file(prefect_file: str | Path) -> dict:
    import yaml

    path = Path(prefect_file)
    if not path.is_file():
        raise FileNotFoundError(f"no Prefect deployment file at {path} (run from the checkout)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def pool_names(prefect_file: str | Path = PREFECT_FILE) -> list[str]:
    """The work pools the deployments of `prefect_file` name, in order."""
    names = [d["work_pool"]["name"] for d in _deploy_file(prefect_file)["deployments"]]
    return list(dict.fromkeys(names))


def ensure_work_pools(names: list[str]) -> dict[str, str]:
    """Create the process work pools that do not exist yet ('created'), with the default job
    template of a process worker (as `prefect work-pool create --type process` does, so the
    deployments' `job_variables` apply); existing ones are left as they are ('exists')."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()

    done = {}
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(name)
                done[name] = "exists"
                continue
            except ObjectNotFound:
                pass
            try:
                pool = WorkPoolCreate(name=name, type="process", base_job_template=template)
                client.create_work_pool(pool)
                done[name] = "created"
            except ObjectAlreadyExists:  # created by someone else meanwhile
                done[name] = "exists"
    return done


def schedule_states(deployments: list[str] | None = None) -> dict[tuple[str, str], bool]:
    """(deployment, schedule slug or cron) → active, for the deployments on the server."""
    from prefect.client.orchestration import get_client

    states = {}
    with get_client(sync_client=True) as client:
        for d in client.read_deployments(limit=200):
            if deployments is None or d.name in deployments:
                for s in d.schedules:
                    states[(d.name, _schedule_key(s))] = bool(s.active)
    return states


def _schedule_key(schedule) -> str:
    return schedule.slug or getattr(schedule.schedule, "cron", None) or str(schedule.id)


def set_schedules(active: dict[tuple[str, str], bool] | bool, deployments: list[str]) -> list:
    """Switch the schedules of `deployments` on or off (one bool for all, or per key); returns
    (deployment, schedule, cron, active) rows as they are afterwards."""
    from prefect.client.orchestration import get_client

    rows = []
    with get_client(sync_client=True) as client:
        for d in client.read_deployments(limit=200):
            if d.name not in deployments:
                continue
            for s in d.schedules:
                key = _schedule_key(s)
                want = active if isinstance(active, bool) else active.get((d.name, key), s.active)
                if bool(want) != bool(s.active):
                    client.update_deployment_schedule(d.id, s.id, active=bool(want))
                cron = getattr(s.schedule, "cron", "")
                rows.append((d.name, key, cron, bool(want)))
    return rows


def configured_api() -> str:
    """The Prefect API deployments go to; refused when none is set (Prefect would deploy to a
    temporary server of its own, gone with this process)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ValueError(
            "no Prefect API to deploy to: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api of `prefect server start`, or the stack's stack.env)"
        )
    return str(url)


def deploy(prefect_file: str | Path = PREFECT_FILE, schedules_active: bool = False) -> dict:
    """Deploy every deployment of `prefect_file` to the configured Prefect API (see module doc)."""
    api = configured_api()
    spec = _deploy_file(prefect_file)
    names = [d["name"] for d in spec["deployments"]]
    pools = ensure_work_pools(pool_names(prefect_file))
    before: dict[tuple[str, str], bool] = {k: v for k, v in schedule_states(names).items() if v}
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy"]
    done = subprocess.run(
        [*command, "--prefect-file", str(prefect_file), "--all"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise RuntimeError(f"prefect deploy --prefect-file {prefect_file} --all failed:\n{tail}")
    # new schedules stay paused unless asked; the ones active before stay active
    rows = set_schedules(True if schedules_active else before, names)
    return {"ok": True, "api": api, "work_pools": pools, "deployments": names, "schedules": rows}


def deploy_text(summary: dict) -> str:
    """What `deploy` did, for people."""
    lines = [f"Prefect API: {summary['api']}"]
    lines += [f"work pool {name}: {state}" for name, state in summary["work_pools"].items()]
    lines.append(f"deployed: {', '.join(summary['deployments'])}")
    for name, key, cron, active in summary["schedules"]:
        lines.append(f"schedule {name} {cron or key}: {'ACTIVE' if active else 'paused'}")
    if any(not row[3] for row in summary["schedules"]):
        lines.append(
            "paused schedules start no run: activate them with "
            "`python -m pivotmap.flows.deploy schedules --active` (or --schedules-active here)"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the `deploy` command (also usable as `pivotmap deploy`)."""
    parser.add_argument("--prefect-file", default=PREFECT_FILE, help="deployment file")
    parser.add_argument(
        "--schedules-active", action="store_true",
        help="start the production schedules now (default: new schedules are paused; ones "
        "already active stay active)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m pivotmap.flows.deploy deploy|pools|limits|schedules`."""
    parser = argparse.ArgumentParser(prog="python -m pivotmap.flows.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("deploy", help="work pools, limits, every deployment"))
    pools = sub.add_parser("pools", help="create the work pools the deployment file names")
    pools.add_argument("--prefect-file", default=PREFECT_FILE)
    sub.add_parser("limits", help="create or update the global concurrency limits")
    schedules = sub.add_parser("schedules", help="switch the deployments' schedules on or off")
    schedules.add_argument("--prefect-file", default=PREFECT_FILE)
    state = schedules.add_mutually_exclusive_group(required=True)
    state.add_argument("--active", action="store_true", help="start every schedule")
    state.add_argument("--paused", action="store_true", help="pause every schedule")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command != "deploy":
        configured_api()
    if args.command == "limits":
        for name, limit in ensure_concurrency_limits().items():
            print(f"global concurrency limit {name}: {limit}")
    elif args.command == "pools":
        for name, state_ in ensure_work_pools(pool_names(args.prefect_file)).items():
            print(f"work pool {name}: {state_}")
    elif args.command == "schedules":
        names = [d["name"] for d in _deploy_file(args.prefect_file)["deployments"]]
        for name, key, cron, active in set_schedules(bool(args.active), names):
            print(f"schedule {name} {cron or key}: {'ACTIVE' if active else 'paused'}")
    else:
        print(deploy_text(deploy(args.prefect_file, args.schedules_active)))


if __name__ == "__main__":
    sys.exit(main())
