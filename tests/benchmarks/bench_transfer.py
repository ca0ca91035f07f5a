"""Transfer benchmark (issue 15): train on region A / year 1, score on A's held-out blocks and
on every labelled pixel of region B / year 2, for every model the chain trains, over seeds.

Region B differs from A as real places and years do (`tasks.synthetic.generate_demo_region`'s
options): its season comes later and lasts longer, its summer is a drought, its class mix and
sub-types differ (spring cereals and late maize instead of mostly winter cereals and early
maize, more grazed pasture), its sky is cloudier and S1 sees it from other (descending) orbits.

Both regions go through the chain's own stages (ingest, pivot, sample, as `pivotmap` runs them,
without Prefect); the models are trained as `pivotmap train` trains them (the demo config's
train settings, cut down by the arguments below) and evaluated with A's normalisation on B.

    .venv/bin/python tests/benchmarks/bench_transfer.py --out out/bench-transfer
    # bigger: --tiles 3 --tile-size 64 --epochs 40 --seeds 0,1,2,3,4

Models (`--models`): the fusion network as configured, without pretraining, with calendar
augmentations, with a calendar-free summary token (`train.summary_token`), pretrained on B's
unlabelled pixels too (`fusion_target_pretrain`), and as the production chain maps a region
(`fusion_calendar`: each region's series moved by the shift predict's `calendar_shift: auto`
finds on 4096 of its pixels, labels unused; the shifts are in the JSON lines); the forests and
boosted trees on date-indexed or percentile features.

`--scenario unseen` gives A none of B's sub-types (as a training site without the crop types
of the mapped one); use another --out for each scenario.

`--ensemble N` adds the `train.ensemble_members: N` arm: for each seed s, N members (seeds
s … s+N-1, each pretrained and trained with its own seed) trained as `pivotmap train` trains
them, scored as the ensemble (`fusion_ensembleN`), as its first member alone
(`fusion_ensembleN_first`) and as every member alone (`fusion_ensembleN_members`: each is what
the `fusion` arm gives for its seed); `--member-pretraining shared` fine-tunes every member
from one pretraining of seed s instead (`…_shared` arms). Seeds N apart (`--seeds 0,3,6
--ensemble 3`) keep the ensembles' members disjoint:

    .venv/bin/python tests/benchmarks/bench_transfer.py --out out/bench-transfer \
        --models rf_percentiles --seeds 0,3,6 --ensemble 3

Prints one JSON line per model and split (`split`: `A_heldout` or `B_other_year`) with OA and
macro-F1 mean, std, min and max over the seeds and the per-seed figures; then a table on
stderr. The regions, cubes and tables are kept under --out and reused by a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import time as clock
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_date_shift's helpers

YEAR_A, YEAR_B = 2022, 2023  # both 365 days: date-indexed features line up step for step
SEED_A, SEED_B = 42, 1042  # another seed: another parcel layout (another place)
SUBTYPES_A = {1: 0.1, 2: 0.1, 3: 0.2}  # A: mostly winter cereals, early maize, mown meadows
SCENARIOS = {
    # A's sub-type shares: B's sub-types seen in A (a little), or never (A = the demo region)
    "seen": SUBTYPES_A,
    "unseen": {},
}
SUBTYPES_B = {1: 0.6, 2: 0.6, 3: 0.6}  # B: mostly spring cereals, late maize, pasture


def region_b_conditions() -> dict:
    """How region B / year 2 differs from A (keyword options of `generate_demo_region`)."""
    from pivotmap.tasks.synthetic import S1Track

    return {
        "phenology_shift_days": 30,
        "phenology_stretch": 1.15,
        "parcel_jitter_days": 10,
        "drought": 0.7,
        "class_weights": (0.2, 0.2, 0.3, 0.1, 0.1, 0.1),
        "subtype_shares": SUBTYPES_B,
        "clear_probability": 0.3,
        "overcast_probability": 0.2,
        "s1_tracks": (
            S1Track(110, clock(5, 58, 12), -1.0, "descending"),
            S1Track(37, clock(6, 6, 40), 0.6, "descending"),
        ),
    }


# ---------------------------------------------------------------------------- the chain
def prepare_region(
    out: Path, name: str, year: int, seed: int, tiles: int, tile_size: int, options: dict,
    train: dict,
):  # fmt: skip
    """Generate the region (once), write its config, run ingest, pivot and sample (once each);
    the config and the training table's SampleResult."""
    import yaml

    from pivotmap.config import deep_merge, load_run_config
    from pivotmap.flows.demo import demo_config_dict
    from pivotmap.results import PivotResult, SampleResult
    from pivotmap.tasks.ingest import ingest
    from pivotmap.tasks.pivot import build_pivot
    from pivotmap.tasks.sampling import sample
    from pivotmap.tasks.synthetic import generate_demo_region
    from pivotmap.tasks.workspace import Workspace

    folder = out / name
    start, end = f"{year}-01-01", f"{year}-12-31"
    if not (folder / "data" / "catalog.json").is_file():
        started = time.monotonic()
        generate_demo_region(
            folder / "data", seed=seed, tiles_x=tiles, tiles_y=tiles, tile_size=tile_size,
            start=start, end=end, **options,
        )  # fmt: skip
        log(f"{name}: generated in {time.monotonic() - started:.0f} s")
    raw = demo_config_dict("data", seed)
    x0, y0 = raw["grid"]["origin_x"], raw["grid"]["origin_y"]
    edge = tiles * tile_size * raw["grid"]["resolution"]
    layer = {
        "name": f"transfer-{name.lower()}",
        "grid": {"tile_size": tile_size},
        "region": {"bbox": [x0, y0, x0 + edge, y0 + edge]},
        "period": {"start": start, "end": end},
        "train": train,
        "predict": {"workers": 1},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(raw, layer), sort_keys=False))
    config = load_run_config(path)
    ws = Workspace.open(config, folder / "run")
    for stage, result_type, run in (
        ("ingest", None, ingest),
        ("pivot", PivotResult, build_pivot),
        ("sample", SampleResult, sample),
    ):
        if result_type is not None and ws.find_result(result_type) is not None:
            continue
        if stage == "ingest" and ws.find_result(PivotResult) is not None:
            continue
        started = time.monotonic()
        run(ws)
        log(f"{name}: {stage} in {time.monotonic() - started:.0f} s")
    return config, ws.read_result(SampleResult)


def other_region(data, table):
    """`TrainingData` of every labelled row of another region's `table`, with `data`'s model
    spec (its classes and normalisation): all of them held out."""
    from pivotmap.models.datamodule import Inputs

    labelled = np.flatnonzero(
        (table.split != "unlabelled") & np.isin(table.codes, data.spec.classes)
    )
    return replace(
        data, table=table, labelled=labelled, x=Inputs(table, labelled, data.spec),
        codes=table.codes[labelled], is_test=np.ones(len(labelled), dtype=bool),
        train_idx=np.arange(0), x_unlabelled=Inputs(table, labelled[:0], data.spec),
    )  # fmt: skip


def with_target(config, sample_a, sample_b):
    """A's `TrainingData` whose pretraining pool also draws from every pixel of B's table,
    labels unused (B's cube exists before B is mapped)."""
    from pivotmap.models.datamodule import prepare_data, read_tables

    table = read_tables([sample_a, sample_b])
    split = np.where(table.source == 1, "unlabelled", table.split)
    return prepare_data(config, replace(table, split=split))


# ---------------------------------------------------------------------------- the models
def network_scores(
    data_a, data_b, tc, pretrain: bool, calendar: bool = False
) -> tuple[dict, dict, float]:
    """Train the fusion network as `pivotmap train` does (pretraining first when `pretrain`);
    its scores on A's held-out pixels and on B. With `calendar`, each region is classified as
    `predict.calendar_shift: auto` classifies it: its series moved by the shift estimated on
    4096 of its pixels, labels unused (the shifts are added to the scores)."""
    from pivotmap.models.trainer import evaluate, pretrain_encoder, train_classifier
    from pivotmap.models.training import cpu_threads

    started = time.monotonic()
    data_a = replace(data_a, spec=data_a.spec.replace(summary=tc.summary_token))
    with cpu_threads("cpu", tc.cpu_threads or 1):
        init = pretrain_encoder(data_a, tc, "cpu")["state"] if pretrain else None
        model = train_classifier(data_a, tc, "cpu", init).model
        if calendar:  # every row of each region's table is a candidate pixel
            from bench_date_shift import calendar_aligned

            every_a, every_b = (np.arange(len(d.table.codes)) for d in (data_a, data_b))
            data_a, shift_a = calendar_aligned(model, data_a, every_a, tc.seed)
            data_b, shift_b = calendar_aligned(model, data_b, every_b, tc.seed)
        a, b = evaluate(model, data_a, "cpu"), evaluate(model, data_b, "cpu")
    if calendar:
        a["calendar_shift_days"], b["calendar_shift_days"] = shift_a, shift_b
    return a, b, time.monotonic() - started


def ensemble_scores(
    data_a, data_b, tc, separate: bool = True
) -> tuple[list[tuple[dict, dict]], float]:
    """Train `tc.ensemble_members` members as `pivotmap train` does (each pretrains with its own
    seed; without `separate`, all members fine-tune one pretraining of `tc.seed` instead);
    (A, B) scores of the ensemble first, then of each member alone."""
    from pivotmap.models.network import ensemble_of
    from pivotmap.models.trainer import (
        evaluate,
        member_config,
        pretrain_encoder,
        train_classifier,
        train_members,
    )
    from pivotmap.models.training import cpu_threads

    def pretrained(tc):
        return pretrain_encoder(data_a, tc, "cpu")["state"] if tc.pretrain_epochs else None

    started = time.monotonic()
    with cpu_threads("cpu", tc.cpu_threads or 1):
        if separate:
            members = [f.model for f in train_members(data_a, tc, "cpu")[0]]
        else:
            each = [member_config(tc, i) for i in range(tc.ensemble_members)]
            init = pretrained(tc)
            members = [train_classifier(data_a, t, "cpu", init).model for t in each]
        models = [ensemble_of(members), *members]
        scores = [(evaluate(m, data_a, "cpu"), evaluate(m, data_b, "cpu")) for m in models]
    return scores, time.monotonic() - started


def baseline_scores(data_a, data_b, tc) -> tuple[dict, dict, float]:
    """The configured baseline (`train.baseline_*`) trained on A; its scores on A and B."""
    from threadpoolctl import threadpool_limits

    from pivotmap.models.evaluation import metrics
    from pivotmap.models.trainer import baseline_features, fit_baseline

    started = time.monotonic()
    fa, fb = baseline_features(data_a, tc), baseline_features(data_b, tc)
    with threadpool_limits(tc.cpu_threads or 1):  # OpenMP of the boosted trees, as torch's
        model = fit_baseline(fa[data_a.train_idx], data_a.codes[data_a.train_idx], tc)
    classes = data_a.spec.classes
    a = metrics(data_a.codes[data_a.is_test], model.predict(fa[data_a.is_test]), classes)
    b = metrics(data_b.codes, model.predict(fb), classes)
    return a, b, time.monotonic() - started


MODELS = {
    # name: (kind, train overrides)
    "fusion": ("network", {}),
    "fusion_no_pretrain": ("network", {"pretrain_epochs": 0}),
    "fusion_augmented": (
        "network",
        {"augment_shift_days": 30, "augment_stretch": 0.15, "augment_dropout": 0.2},
    ),
    "fusion_shift_only": ("network", {"augment_shift_days": 30}),
    "fusion_target_pretrain": ("network_target", {}),
    "fusion_summary": ("network", {"summary_token": True}),
    "fusion_calendar": ("network_calendar", {}),
    "rf_temporal": ("baseline", {"baseline_features": "temporal"}),
    "rf_percentiles": ("baseline", {"baseline_features": "percentiles"}),
    "gbt_percentiles": (
        "baseline",
        {"baseline_features": "percentiles", "baseline_model": "gradient_boosting"},
    ),
}


def summarise(model: str, split: str, runs: list[dict]) -> dict:
    """OA and macro-F1 mean, std, min, max over the seeds, per-class F1 means, per-seed rows."""
    out: dict = {"model": model, "split": split, "seeds": [r["seed"] for r in runs]}
    for key in ("overall_accuracy", "macro_f1"):
        values = np.array([r[key] for r in runs])
        out[key] = {
            "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4), "max": round(float(values.max()), 4),
            "per_seed": [round(float(v), 4) for v in values],
        }  # fmt: skip
    codes = runs[0]["per_class_f1"].keys()
    out["per_class_f1"] = {
        c: round(float(np.mean([r["per_class_f1"][c] for r in runs])), 3) for c in codes
    }
    out["n_pixels"] = runs[0]["n_test_pixels"]
    if "calendar_shift_days" in runs[0]:
        out["calendar_shift_days"] = [r["calendar_shift_days"] for r in runs]
    out["train_s_mean"] = round(float(np.mean([r["train_s"] for r in runs])), 1)
    return out


def log(message: str) -> None:
    print(f"[bench_transfer] {message}", file=sys.stderr, flush=True)


def main(args: list[str] | None = None) -> list[dict]:
    from pivotmap.models.datamodule import prepare_data, read_tables
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/bench-transfer")
    p.add_argument("--tiles", type=int, default=2, help="tiles per side of each region")
    p.add_argument("--tile-size", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--trees", type=int, default=100, help="baseline trees / boosting rounds")
    p.add_argument("--max-train-pixels", type=int, default=3000)
    p.add_argument("--max-unlabelled-pixels", type=int, default=2000, help="pretraining pool")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)} (or none: '')"
    )
    p.add_argument(
        "--member-pretraining",
        choices=("shared", "separate"),
        default="separate",
        help="each of the ensemble's members pretrains with its own seed (as `pivotmap train`) "
        "or all share one pretraining",
    )
    p.add_argument(
        "--ensemble", type=int, default=1,
        help="N > 1: also train N-member ensembles of the fusion network (members s … s+N-1 "
        "for each seed s) and score them, their first and every member",
    )  # fmt: skip
    p.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default="seen",
        help="seen: A holds 10-20 %% of B's sub-types (spring cereals, late maize, pasture); "
        "unseen: A holds none of them (A is the demo region as generated by default)",
    )  # fmt: skip
    a = p.parse_args(args)
    out = Path(a.out).resolve()
    seeds = [int(s) for s in a.seeds.split(",")]
    models = [m for m in a.models.split(",") if m]
    if unknown := set(models) - set(MODELS):
        p.error(f"unknown --models {sorted(unknown)}: choose among {', '.join(MODELS)}")
    train = {
        "epochs": a.epochs, "pretrain_epochs": a.pretrain_epochs, "baseline_trees": a.trees,
        "max_train_pixels": a.max_train_pixels, "cpu_threads": 1, "seed": 0,
        "max_unlabelled_pixels": a.max_unlabelled_pixels,
    }  # fmt: skip
    every = {"max_train_pixels": 100_000, "max_test_pixels": 100_000}
    size = (a.tiles, a.tile_size)
    config_a, sample_a = prepare_region(
        out, "A", YEAR_A, SEED_A, *size, {"subtype_shares": SCENARIOS[a.scenario]}, train
    )
    _, sample_b = prepare_region(
        out, "B", YEAR_B, SEED_B, *size, region_b_conditions(), train | every
    )
    data_a = prepare_data(config_a, read_tables([sample_a]))
    data_b = other_region(data_a, read_tables([sample_b]))
    data_target = (
        with_target(config_a, sample_a, sample_b)
        if any(MODELS[m][0] == "network_target" for m in models)
        else None
    )
    log(
        f"A: {len(data_a.train_idx)} training, {int(data_a.is_test.sum())} held-out pixels; "
        f"B: {len(data_b.codes)} labelled pixels; {data_a.spec.n_steps} steps"
    )
    lines = []
    if a.ensemble > 1:
        separate = a.member_pretraining == "separate"
        lines += ensemble_arm(
            data_a, data_b, config_a.train, seeds, a.ensemble, a.scenario, separate
        )
    for name in models:
        kind, overrides = MODELS[name]
        runs: dict[str, list[dict]] = {"A_heldout": [], "B_other_year": []}
        for seed in seeds:
            tc = config_a.train.model_copy(update={**overrides, "seed": seed})
            if kind == "network":
                sa, sb, took = network_scores(data_a, data_b, tc, tc.pretrain_epochs > 0)
            elif kind == "network_calendar":
                sa, sb, took = network_scores(data_a, data_b, tc, True, calendar=True)
            elif kind == "network_target":
                sa, sb, took = network_scores(data_target, data_b, tc, True)
            else:
                sa, sb, took = baseline_scores(data_a, data_b, tc)
            for split, scores in (("A_heldout", sa), ("B_other_year", sb)):
                runs[split].append(scores | {"seed": seed, "train_s": took})
            log(
                f"{name} seed {seed}: A OA {sa['overall_accuracy']:.3f}, "
                f"B OA {sb['overall_accuracy']:.3f} ({took:.0f} s)"
            )
        for split, rows in runs.items():
            line = summarise(name, split, rows) | {"scenario": a.scenario}
            print(json.dumps(line), flush=True)
            lines.append(line)
    print_table(lines)
    return lines


def ensemble_arm(
    data_a, data_b, tc, seeds: list[int], n: int, scenario: str, separate: bool = True
) -> list[dict]:
    """The ensemble arm: one summary line per split for the ensembles (with their agreement),
    their first members and all their members (printed as JSON)."""
    arm = f"fusion_ensemble{n}" + ("" if separate else "_shared")
    names = (arm, f"{arm}_first", f"{arm}_members")
    runs: dict[tuple[str, str], list[dict]] = {}
    for seed in seeds:
        member_tc = tc.model_copy(update={"seed": seed, "ensemble_members": n})
        scored, took = ensemble_scores(data_a, data_b, member_tc, separate)
        named = [(names[0], seed, scored[0]), (names[1], seed, scored[1])]
        named += [(names[2], seed + i, pair) for i, pair in enumerate(scored[1:])]
        for name, run_seed, pair in named:
            for split, scores in zip(("A_heldout", "B_other_year"), pair, strict=True):
                row = scores | {"seed": run_seed, "train_s": took}
                runs.setdefault((name, split), []).append(row)
        (ea, eb), (fa, fb) = scored[0], scored[1]
        log(
            f"ensemble of {n}, seed {seed}: A OA {ea['overall_accuracy']:.3f} (first member "
            f"{fa['overall_accuracy']:.3f}), B OA {eb['overall_accuracy']:.3f} (first "
            f"{fb['overall_accuracy']:.3f}), agreement on B {eb['agreement']['mean']:.3f} "
            f"({took:.0f} s)"
        )
    lines = []
    for (name, split), rows in runs.items():
        line = summarise(name, split, rows) | {"scenario": scenario}
        if name == names[0]:
            line["agreement_per_seed"] = [r["agreement"] for r in rows]
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def print_table(lines: list[dict]) -> None:
    log(f"{'model':<28}{'split':<14}{'OA mean':>8}{'min':>7}{'max':>7}{'F1 mean':>9}{'min':>7}")
    for r in lines:
        oa, f1 = r["overall_accuracy"], r["macro_f1"]
        log(
            f"{r['model']:<28}{r['split']:<14}{oa['mean']:>8.3f}{oa['min']:>7.3f}{oa['max']:>7.3f}"
            f"{f1['mean']:>9.3f}{f1['min']:>7.3f}"
        )


if __name__ == "__main__":
    main()
