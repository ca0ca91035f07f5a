"""The `pivotmap` command line: parse arguments, call a flow, print its summary.

Heavy libraries (Prefect, torch, MLflow, GDAL) are imported only inside the handlers, so that
`pivotmap --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("ingest", "pivot", "train", "predict", "publish")


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
    produce = sub.add_parser("produce", help="run ingest → pivot → train → predict → publish")
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
    for stage in STAGES:
        _common(sub.add_parser(stage, help=f"run the {stage} stage only"))
    return parser


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", required=True, help="run config YAML (see infra/configs/)")
        p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--force", action="store_true", help="redo finished tiles")
    p.add_argument(
        "--json", action="store_true", help="print the run summary as one JSON line on stdout"
    )


def run(args: argparse.Namespace) -> dict:
    from pivotmap.flows.config import load_run_config

    if args.command == "download":
        return _download(args)
    if args.command == "demo":
        from pivotmap.flows.demo import prepare_demo
        from pivotmap.flows.produce import produce_flow

        config, path = prepare_demo(Path(args.out), seed=args.seed)
        return {
            "demo_config": str(path),
            **produce_flow(config, str(Path(args.out)), force=args.force),
        }
    config = load_run_config(args.config)
    if args.command == "produce":
        from pivotmap.flows.produce import produce_flow

        return produce_flow(config, args.out, force=args.force, train=not args.no_train)
    return _stage(args.command, config, args)


def _stage(name: str, config, args) -> dict:
    import importlib

    module = importlib.import_module(f"pivotmap.flows.{name}")
    flow = getattr(module, f"{name}_flow")
    if name in ("ingest", "pivot", "predict"):
        return flow(config, args.out, force=args.force)
    return flow(config, args.out)


def _download(args: argparse.Namespace) -> dict:
    from pivotmap.flows.progress import track
    from pivotmap.tasks.download import download_map, find_items, parse_bbox

    bbox = parse_bbox(args.bbox)
    items = find_items(args.catalog, bbox)
    bar = iter(track(range(len(items)), "download", total=len(items)))
    result = download_map(
        items, bbox, Path(args.out), args.asset, on_file=lambda _: next(bar, None)
    )
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
