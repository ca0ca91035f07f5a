"""The `pivotmap` command line: parse arguments, call a flow, print its summary.

Heavy libraries (Prefect, torch, MLflow, GDAL) are imported only inside the handlers, so that
`pivotmap --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pivotmap.results import StageResult

STAGES = ("ingest", "pivot", "sample", "train", "predict", "publish")


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
    download = sub.add_parser("download", help="download a published map for a bounding box")
    download.add_argument(
        "--catalog", required=True, help="catalog.json of a published map (path or s3://)"
    )
    download.add_argument("--bbox", required=True, help="W,S,E,N in degrees (EPSG:4326)")
    download.add_argument("--out", required=True, help="output GeoTIFF (COG)")
    download.add_argument("--asset", default="class", help="'class' (default) or 'confidence'")
    download.add_argument(
        "--json", action="store_true", help="print the summary as one JSON line on stdout"
    )
    _status_parser(sub)
    _rollback_parser(sub)
    _concept_parser(sub)
    _plan_parser(sub)
    for stage in STAGES:
        _common(sub.add_parser(stage, help=f"run the {stage} stage only"))
    return parser


def _status_parser(sub) -> None:
    status = sub.add_parser("status", help="recent flow runs and published map versions")
    status.add_argument("--api", help="Prefect API URL (default: $PREFECT_API_URL)")
    status.add_argument("--out", help="a run folder: list the versions under its products/")
    status.add_argument("--catalog", help="or a published catalog.json (path or s3://)")
    status.add_argument("--limit", type=int, default=20, help="flow runs shown (default: 20)")
    status.add_argument(
        "--json", action="store_true", help="print the status as one JSON line on stdout"
    )


def _rollback_parser(sub) -> None:
    rollback = sub.add_parser(
        "rollback", help="serve an older published version again (catalog.json switch)"
    )
    rollback.add_argument("version", help="a version kept under OUT/products/ (see `status`)")
    rollback.add_argument("--out", required=True, help="the run folder (its products/ is used)")
    rollback.add_argument("--target", help="also switch this mirror (folder or s3://bucket/prefix)")
    rollback.add_argument(
        "--json", action="store_true", help="print the summary as one JSON line on stdout"
    )


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
    plan.add_argument(
        "--json", action="store_true", help="print the plan as one JSON line on stdout"
    )


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
    concept.add_argument(
        "--json", action="store_true", help="print the summary as one JSON line on stdout"
    )


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", required=True, help="run config YAML (see infra/configs/)")
        p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--force", action="store_true", help="redo finished tiles")
    p.add_argument(
        "--json", action="store_true", help="print the run summary as one JSON line on stdout"
    )


def run(args: argparse.Namespace) -> dict:
    from pivotmap.config import load_run_config

    if args.command == "download":
        return _download(args)
    if args.command == "status":
        return _status(args)
    if args.command == "rollback":
        from pivotmap.flows.status import rollback

        return rollback(Path(args.out) / "products", args.version, args.target)
    if args.command == "demo":
        from pivotmap.flows.demo import prepare_demo
        from pivotmap.flows.produce import produce_flow

        config, path = prepare_demo(Path(args.out), seed=args.seed)
        result = produce_flow(config, str(Path(args.out)), force=args.force)
        return {"demo_config": str(path), **result.to_dict()}
    config = load_run_config(args.config)
    if args.command == "plan":
        return _plan(config, args)
    if args.command == "concept":
        from pivotmap.models.concept import concept_map, find_workspace

        return concept_map(
            config, find_workspace(args.config, args.workspace), args.prompt, args.out
        )
    if args.command == "produce":
        from pivotmap.flows.produce import produce_flow

        return produce_flow(config, args.out, force=args.force, train=not args.no_train).to_dict()
    return _stage(args.command, config, args).to_dict()


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
    items = find_items(args.catalog, bbox)
    bar = iter(track(range(len(items)), "download", total=len(items)))

    def advance(_item_id: str) -> None:
        next(bar, None)

    result = download_map(items, bbox, Path(args.out), args.asset, on_file=advance)
    for _ in bar:  # close the bar
        pass
    return {"ok": True, **result}


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
    return "pivotmap: done\n" + "\n".join(lines) if lines else "pivotmap: done"


def main(argv: list[str] | None = None) -> int:
    from pivotmap.runtime import apply_offline_defaults

    args = build_parser().parse_args(argv)
    apply_offline_defaults()
    try:
        summary = run(args)
    except KeyboardInterrupt:
        print("pivotmap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends in one line naming the input
        message = _one_line(exc)
        print(f"pivotmap: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "command": args.command, "error": message}), flush=True)
        return 1
    print(_human(summary), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, default=str, sort_keys=True), flush=True)
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
