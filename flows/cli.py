"""The `pivotmap` command line: parse arguments, call a flow, print its summary.

Heavy libraries (Prefect, torch, MLflow, GDAL) are imported only inside the handlers, so that
`pivotmap --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pivotmap.results import StageResult
    from pivotmap.tasks.gazetteer import Place

STAGES = ("ingest", "pivot", "sample", "train", "predict", "publish")
FLOW_COMMANDS = ("demo", "produce", *STAGES)  # the commands that run Prefect flows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pivotmap",
        description="Operational land-cover maps from Sentinel-1/2: STAC → daily pivot cube → model → COG + STAC.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="generate a synthetic region and produce its map end to end")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--seed", type=int, default=42, help="seed of the synthetic region")
    _common(demo, config=False)
    produce = sub.add_parser(
        "produce", help="run ingest → pivot → sample → train → predict → publish"
    )
    _common(produce)
    produce.add_argument(
        "--no-train",
        action="store_true",
        help="predict with the current champion instead of training",
    )
    _place_flags(produce, "map this place instead of the config's region")
    download = sub.add_parser("download", help="download a published map for a bounding box")
    download.add_argument(
        "--catalog",
        required=True,
        help="a published map: its catalog.json or products folder (path, s3:// or http(s)://), "
        "or a STAC API (http(s)://…, e.g. what `pivotmap serve` starts at /api/)",
    )
    download.add_argument(
        "--version", default=None, help="a kept product version (default: the current one)"
    )
    download.add_argument("--bbox", required=True, help="W,S,E,N in degrees (EPSG:4326)")
    download.add_argument("--out", required=True, help="output GeoTIFF (COG)")
    download.add_argument("--asset", default="class", help="'class' (default) or 'confidence'")
    _json_flag(download)
    _check_parser(sub)
    _status_parser(sub)
    _rollback_parser(sub)
    _promote_parser(sub)
    _concept_parser(sub)
    _plan_parser(sub)
    from pivotmap.flows.serve import add_parser as _serve_parser  # issue 17: pivotmap serve

    _serve_parser(sub)
    from pivotmap.flows.deploy import add_arguments as _deploy_arguments

    deploy = sub.add_parser(
        "deploy",
        help="create missing work pools and limits, deploy infra/prefect.yaml (schedules paused)",
    )
    _deploy_arguments(deploy)
    _json_flag(deploy)
    for stage in STAGES:
        _common(sub.add_parser(stage, help=f"run the {stage} stage only"))
    for command in sub.choices.values():
        command.add_argument(
            "--debug", action="store_true", help="print the full traceback of an error"
        )
    from pivotmap.flows.stack import build_parser as _stack_parser  # its own --json/--debug

    _stack_parser(
        sub.add_parser(
            "stack", help="the production stack on one machine (127.0.0.1): up, status, down"
        )
    )
    return parser


def _json_flag(parser: argparse.ArgumentParser, what: str = "summary") -> None:
    """`--json`: the command's result as one JSON line on stdout (for scripts), every command."""
    parser.add_argument(
        "--json", action="store_true", help=f"print the {what} as one JSON line on stdout"
    )


def _check_parser(sub) -> None:
    check = sub.add_parser(
        "check", help="validate every input a run needs, in seconds, before any pixel is read"
    )
    check.add_argument("--config", required=True, help="run config YAML (see infra/configs/)")
    check.add_argument("--out", help="the run folder: checked writable (and earlier results)")
    check.add_argument(
        "--stage", choices=STAGES, help="only what this stage needs (default: a whole run)"
    )
    _json_flag(check, "checks")


def _check(config, args: argparse.Namespace) -> dict:
    from pivotmap.flows.check import check, checks_text, require

    rows = check(config, args.out, args.stage)
    print(checks_text(rows, f"pivotmap check {args.config}"), file=sys.stderr)
    require(rows, f"config {args.config}")
    return {"ok": True, "checks": [r.to_dict() for r in rows]}


def _preflight(config, args: argparse.Namespace, stage: str | None) -> None:
    """The checks `stage` (None: a whole run) needs, before Prefect starts: a table and an
    error when one fails, nothing otherwise."""
    from pivotmap.flows.check import check, checks_text, require

    rows = check(config, args.out, stage, train=not getattr(args, "no_train", False))
    if any(r.failed for r in rows):
        print(checks_text(rows, f"pivotmap {args.command}: checks"), file=sys.stderr)
    require(rows, f"pivotmap {args.command} cannot start")


def _status_parser(sub) -> None:
    status = sub.add_parser("status", help="recent flow runs and published map versions")
    status.add_argument("--api", help="Prefect API URL (default: $PREFECT_API_URL)")
    status.add_argument("--out", help="a run folder: list the versions under its products/")
    status.add_argument("--catalog", help="or a published catalog.json (path or s3://)")
    status.add_argument("--limit", type=int, default=20, help="flow runs shown (default: 20)")
    _json_flag(status, "status")


def _rollback_parser(sub) -> None:
    rollback = sub.add_parser(
        "rollback", help="serve an older published version again (catalog.json switch)"
    )
    rollback.add_argument("version", help="a version kept under OUT/products/ (see `status`)")
    rollback.add_argument("--out", required=True, help="the run folder (its products/ is used)")
    rollback.add_argument("--target", help="also switch this mirror (folder or s3://bucket/prefix)")
    rollback.add_argument(
        "--stac-api",
        help="also switch the STAC API's pgstac database (postgresql://USER@HOST:PORT/DB, "
        "as publish.stac_api; password from PGPASSWORD)",
    )
    _json_flag(rollback)


def _promote_parser(sub) -> None:
    promote = sub.add_parser(
        "promote", help="make a registered model version @champion by hand (what predict maps with)"
    )
    promote.add_argument("version", help="a registered version number of the config's model")
    promote.add_argument("--config", required=True, help="run config YAML (model name, MLflow)")
    promote.add_argument(
        "--out", help="the run folder (its MLflow store), unless mlflow.tracking_uri is set"
    )
    _json_flag(promote)


def _promote(config, args: argparse.Namespace) -> dict:
    from pivotmap.models.registry import promote, redacted, tracking_uri_for

    if not (config.mlflow.tracking_uri or args.out):
        raise ValueError(
            f"config {args.config} sets no mlflow.tracking_uri: give the run folder with --out"
        )
    tracking = tracking_uri_for(args.out or ".", config.mlflow.tracking_uri)
    done = promote(tracking_uri=tracking, model_name=config.model_name, version=args.version)
    before = f"v{done['previous']}" if done["previous"] else "no champion"
    print(
        f"{done['model']}@champion: {before} -> v{done['champion']} (on {redacted(tracking)}); "
        "predict maps with it from now on",
        file=sys.stderr,
    )
    return {"ok": True, **done}


def _status(args: argparse.Namespace) -> dict:
    from pivotmap.flows.status import status, status_text

    summary = status(args.api, args.out, args.catalog, args.limit)
    print(status_text(summary), file=sys.stderr if args.json else sys.stdout)
    return summary


def _plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan", help="tiles, items, bytes, core-hours and storage of a run, before it runs"
    )
    plan.add_argument("--config", required=True, help="run config YAML (see infra/configs/)")
    plan.add_argument(
        "--offline", action="store_true", help="skip the catalogue: items from the revisit"
    )
    plan.add_argument("--rates", help="rates JSON (bench_scale.py --rates-out); default built in")
    _json_flag(plan, "plan")


def _plan(config, args: argparse.Namespace) -> dict:
    from pivotmap.flows.plan import plan, plan_text

    summary = plan(config, offline=args.offline, rates_file=args.rates)
    print(plan_text(summary), file=sys.stderr if args.json else sys.stdout)
    return summary


def _concept_parser(sub) -> None:
    concept = sub.add_parser(
        "concept", help="map a concept given in plain words (probability COG, 0-100)"
    )
    concept.add_argument("prompt", help='what to map, e.g. "flooded grassland"')
    concept.add_argument("--config", required=True, help="run config YAML of a produced run")
    concept.add_argument("--out", required=True, help="output GeoTIFF (COG)")
    concept.add_argument(
        "--workspace", default=None, help="the run's --out folder (default: the config's folder)"
    )
    _place_flags(concept, "map only this place, within the run's mapped area")
    _json_flag(concept)


def _place_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--place",
        metavar="NAME",
        help=f"{what}: a country ('Belgium') or a town ('Gent', 'Paris, FR', 'Paris, TX'), "
        "resolved offline (Natural Earth country outlines, GeoNames towns of 500+)",
    )
    parser.add_argument(
        "--place-radius-km",
        type=float,
        metavar="KM",
        help="radius of a town's disc (default: from its population, 1-25 km)",
    )


def _place(args: argparse.Namespace) -> Place | None:
    """The place of --place (None without it), announced on stderr."""
    if args.place is None:
        if args.place_radius_km is not None:
            raise ValueError("--place-radius-km is the radius around --place: give both")
        return None
    from pivotmap.tasks.gazetteer import resolve_place

    place = resolve_place(args.place, args.place_radius_km)
    print(f"pivotmap: {place.describe()}", file=sys.stderr)
    return place


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", required=True, help="run config YAML (see infra/configs/)")
        p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--force", action="store_true", help="redo finished tiles")
    _json_flag(p, "run summary")


def run(args: argparse.Namespace) -> dict:
    from pivotmap.config import load_run_config
    from pivotmap.runtime import console_output

    if args.command == "serve":  # issue 17
        from pivotmap.flows.serve import command

        return command(args)
    if args.command == "download":
        return _download(args)
    if args.command == "deploy":
        from pivotmap.flows.deploy import deploy

        return deploy(args.prefect_file, args.schedules_active)
    if args.command == "status":
        return _status(args)
    if args.command == "rollback":
        from pivotmap.flows.status import rollback

        return rollback(Path(args.out) / "products", args.version, args.target, args.stac_api)
    if args.command == "demo":
        console_output(args.debug)
        from pivotmap.flows.demo import prepare_demo
        from pivotmap.flows.produce import produce_flow

        config, path = prepare_demo(Path(args.out), seed=args.seed)
        result = produce_flow(config, str(Path(args.out)), force=args.force)
        return {"demo_config": str(path), **result.to_dict()}
    _refuse_force(args)
    config = load_run_config(args.config)
    if args.command == "check":
        return _check(config, args)
    if args.command == "promote":
        return _promote(config, args)
    if args.command == "plan":
        return _plan(config, args)
    if args.command == "concept":
        from pivotmap.models.concept import concept_map, find_workspace

        place = _place(args)
        summary = concept_map(
            config, find_workspace(args.config, args.workspace), args.prompt, args.out, place
        )
        if place is not None and summary["place"]["covered_share"] < 0.999:
            print(
                f"pivotmap: note: {summary['place']['covered_share']:.0%} of {place.label} lies "
                "in the mapped area; the rest is not mapped (produce it with --place)",
                file=sys.stderr,
            )
        if facts := summary["grounding"]["facts"]:  # how the series itself answers the prompt
            read = "; ".join(
                f"'{f.get('via', f['clause'])}' as {'not ' if f.get('negated') else ''}"
                f"'{f['reads_as']}'"
                for f in facts
            )
            print(
                f"pivotmap: note: {summary['grounding']['share']:.0%} of the prompt is read from "
                f"each pixel's own series: {read}",
                file=sys.stderr,
            )
        return summary
    place = _place(args) if args.command == "produce" else None
    if place is not None:  # the whole chain runs over the place
        from pivotmap.config import RegionConfig

        region = RegionConfig(place=args.place, place_radius_km=args.place_radius_km)
        config = config.model_copy(update={"region": region})
    _preflight(config, args, None if args.command == "produce" else args.command)
    console_output(args.debug)
    if args.command == "produce":
        from pivotmap.flows.produce import produce_flow

        result = produce_flow(config, args.out, force=args.force, train=not args.no_train)
        return {**result.to_dict(), **({"place": place.to_dict()} if place else {})}
    return _stage(args.command, config, args).to_dict()


# Stages with nothing to redo by force: say so instead of ignoring the flag.
NO_FORCE = {
    "train": "train always trains and registers a new model version",
    "publish": "publish always rebuilds the products of the current maps",
}


def _refuse_force(args: argparse.Namespace) -> None:
    if getattr(args, "force", False) and args.command in NO_FORCE:
        raise ValueError(
            f"--force does nothing for `{args.command}`: {NO_FORCE[args.command]} (to redo "
            "tiles, force the stage that made them, e.g. `pivotmap predict --force`); drop --force"
        )


def _stage(name: str, config, args) -> StageResult:
    import importlib

    module = importlib.import_module(f"pivotmap.flows.{name}")
    flow = getattr(module, f"{name}_flow")
    if name in ("ingest", "pivot", "sample", "predict"):
        return flow(config, args.out, force=args.force)
    return flow(config, args.out)


def _download(args: argparse.Namespace) -> dict:
    from pivotmap.progress import track
    from pivotmap.tasks.download import download_map, find_items, parse_bbox

    bbox = parse_bbox(args.bbox)
    items = find_items(args.catalog, bbox, args.version)
    bar = iter(track(range(len(items)), "download", total=len(items)))

    def advance(_item_id: str) -> None:
        next(bar, None)

    result = download_map(items, bbox, Path(args.out), args.asset, on_file=advance)
    for _ in bar:  # close the bar
        pass
    return {"ok": True, **result}


def _done(command: str, summary: dict) -> str:
    """The closing lines for people: what the command did, where the results are."""
    if command == "deploy":
        from pivotmap.flows.deploy import deploy_text

        return deploy_text(summary)
    if command == "download":
        h, w = summary["shape"]
        fetched = summary["bytes_fetched"]
        how = "read by HTTP range requests" if fetched is None else f"{_size(fetched)} fetched"
        version = ", ".join(summary.get("versions") or []) or "?"
        return (
            f"pivotmap: downloaded {len(summary['items'])} map tiles ({summary['asset']}, "
            f"{how}, version {version}, model version "
            f"{', '.join(summary['model_versions'])}) into {summary['out']}: a COG of "
            f"{w} x {h} px, {_size(summary['bytes'])}"
        )
    if command == "rollback":
        was = summary.get("previous") or "nothing"
        line = f"pivotmap: {summary['catalog']} now serves {summary['current']} (was {was})"
        if mirror := summary.get("mirror"):
            line += f"; mirror {mirror.get('target', mirror)} switched too"
        return line
    if command == "status":
        products = summary["products"]
        return (
            f"pivotmap: {len(summary['flow_runs'])} flow runs listed; published map served: "
            f"{products.get('current') or 'none'}"
        )
    if command in ("check", "promote"):
        return "pivotmap: ok"
    return _human(summary)


def _size(n: float) -> str:
    """A byte count for people (kB = 1000 bytes)."""
    for unit in ("bytes", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _human(summary: dict) -> str:
    keys = (
        "map",
        "quicklook",
        "stac_catalog",
        "cube",
        "mlflow",
        "overall_accuracy",
        "macro_f1",
        "product_version",
    )
    lines = [f"  {k}: {summary[k]}" for k in keys if k in summary]
    mlflow = summary.get("mlflow") or {}
    trained, used = mlflow.get("trained_version"), mlflow.get("model_version")
    if trained and trained != used:
        lines.append(
            f"  note: the map was made with v{used} (@champion): v{trained}, trained in this run, "
            f"was not promoted ({summary.get('promotion_reason')}); to map with it: "
            f"`pivotmap promote {trained} --config FILE --out DIR`, then predict and publish"
        )
    return "pivotmap: done\n" + "\n".join(lines) if lines else "pivotmap: done"


# Set in the child process that `_supervised` runs the command in.
CHILD_ENV = "PIVOTMAP_SUPERVISED"


def main(argv: list[str] | None = None) -> int:
    """Run `pivotmap ARGV`; from the console script (`argv` None), commands that run flows
    run in a child process (`_supervised`) so that Ctrl-C stops them cleanly."""
    import signal

    from pivotmap.runtime import apply_offline_defaults

    args = build_parser().parse_args(argv)
    if args.command == "stack":  # services, not a flow: its own summary lines and exit codes
        from pivotmap.flows.stack import run as stack_run

        return stack_run(args)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background of a script (SIGINT ignored, and inherited so): an
        # operator's or a supervisor's SIGINT must still stop the command cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv is None and args.command in FLOW_COMMANDS and CHILD_ENV not in os.environ:
        return _supervised(sys.argv[1:])
    apply_offline_defaults()
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print(f"pivotmap: interrupted; {_resume_note(args)}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # every failure ends in one line naming the input
        message = _one_line(exc)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"pivotmap: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "command": args.command, "error": message}), flush=True)
        return 1
    print(_done(args.command, summary), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, default=str, sort_keys=True), flush=True)
    return 0


def _supervised(argv: list[str]) -> int:
    """Run `pivotmap ARGV` in a child process in its own session, passing Ctrl-C to it alone.

    The terminal sends SIGINT to its whole foreground process group: Prefect's temporary API
    server and the Dask workers would die with the command, and the interrupted flow would
    spend minutes retrying a dead API. Here only the command's own process gets SIGINT (a
    KeyboardInterrupt: the flow reports its crash, the Dask cluster closes, the API stops
    last). A second Ctrl-C terminates the child's whole group, a third kills it.
    """
    import signal
    import subprocess

    env = {**os.environ, CHILD_ENV: "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "pivotmap.flows.cli", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        ladder = {1: (os.kill, signal.SIGINT), 2: (os.killpg, signal.SIGTERM)}
        send, sig = ladder.get(len(received), (os.killpg, signal.SIGKILL))
        with contextlib.suppress(ProcessLookupError):
            send(child.pid, sig)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as shells say


def _die_with_parent() -> None:
    """In `_supervised`'s child, before exec: SIGKILL when the supervising process dies, so
    `kill -9` of the CLI (or of its process group, as a batch system does) still stops the run
    at once, as when the run was the CLI's own process (Linux; elsewhere nothing)."""
    import ctypes
    import signal

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _resume_note(args: argparse.Namespace) -> str:
    """What a re-run of the same command keeps, from the run folder's stage markers."""
    out = getattr(args, "out", None)
    if args.command not in FLOW_COMMANDS or out is None:
        return "nothing was changed"
    try:
        from pivotmap.config import load_run_config
        from pivotmap.flows.status import resume_note

        path = Path(out) / "demo.yaml" if args.command == "demo" else Path(args.config)
        return resume_note(load_run_config(path), out)
    except Exception as exc:  # the note must never hide the interrupt
        return f"re-run the same command to resume ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":  # the child process of `_supervised`
    code = main()
    if code == 130:  # interrupted: the line saying what a re-run keeps is out; stop now
        from pivotmap.runtime import exit_now

        exit_now(code)
    sys.exit(code)
