"""Benchmark (issue 15): held-out accuracy on a real region when the test pixels' season comes
earlier or later than in training (default: the Flanders patch; shifts of ±15 and ±30 days).

A shift of +d days moves each held-out pixel's series d days later along the pivot's time axis
(what a later spring or a later sowing does to a parcel): the value of step t becomes that of
step t - d/step_days, the first steps repeating the first value; the days of year the model is
given stay those of the cube. The training pixels are never shifted. d is rounded to whole pivot
steps (the effective shift is printed).

Models, trained as `pivotmap train` trains them (the config's train settings; `--epochs` cuts
them down) on the unshifted training pixels, once per seed:
- `network`: the production network (pretraining when `train.pretrain_epochs`, augmentation as
  configured);
- `baseline`: the configured baseline (`train.baseline_model` on `train.baseline_features`);
- `date_indexed_rf`: a random forest on date-indexed temporal features (the chain's former
  baseline), for contrast;
- `network_calendar`: the same network, the held-out pixels classified as predict's
  `calendar_shift: auto` classifies a region: their series moved back by the shift
  `models.calendar` finds between their season and the training table's (labels unused; the
  shift found is printed).

    .venv/bin/python tests/benchmarks/bench_date_shift.py --out out/bench-flanders \
        --seeds 0,1,2 [--shifts -30,-15,0,15,30] [--config infra/configs/flanders.yaml]

Builds the cube first when `--out` has none (ingest + pivot, as bench_models.py). Prints one JSON
line per model and shift (OA and macro-F1 per seed, mean, std), then a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build_cube, load  # noqa: E402


def step_days(doy: np.ndarray) -> int:
    """The pivot's step, from one row's days of year (wrapping at the new year)."""
    return int(np.median(np.diff(doy[0].astype(int)) % 365)) or 1


def shifted(data, days: int):
    """`data` with every table row's series moved `days` later (earlier when negative;
    `models.calendar.shift_series`); only the held-out pixels are scored on it."""
    from pivotmap.models.calendar import shift_series

    k = int(round(days / step_days(data.table.doy)))
    if k == 0:
        return data, 0
    table = replace(data.table, series=shift_series(data.table.series, k))
    out = replace(
        data, table=table, x=replace(data.x, table=table),
        x_unlabelled=replace(data.x_unlabelled, table=table),
    )  # fmt: skip
    return out, k * step_days(data.table.doy)


def scores(truth: np.ndarray, predicted: np.ndarray, classes) -> dict:
    from pivotmap.models.evaluation import metrics

    s = metrics(truth, predicted, classes)
    return {
        "overall_accuracy": round(s["overall_accuracy"], 4),
        "macro_f1": round(s["macro_f1"], 4),
    }


def calendar_aligned(model, data, rows: np.ndarray, seed: int, pixels: int = 4096):
    """`data` with every table row's series moved by the shift `models.calendar.estimate_shift`
    finds on up to `pixels` of the table rows `rows` (labels unused), as predict's
    `calendar_shift: auto` moves a region's; and that shift in days."""
    from pivotmap.models.calendar import estimate_shift

    picked = np.sort(np.random.default_rng(seed).permutation(rows)[:pixels])
    names, spec = model.spec.channels[:-2], model.spec
    series = data.table.decoded(names, picked)
    found = estimate_shift(spec.season, series, names, spec.step_days, 60)
    return shifted(data, found.days)[0], found.days


def run_seed(data, tc, seed: int, shifts: list[int]) -> dict[str, dict[int, dict]]:
    """Each model's scores on the held-out pixels at each shift, for one seed."""
    from pivotmap.models.trainer import (
        baseline_features,
        fit_baseline,
        pretrain_encoder,
        train_classifier,
    )
    from pivotmap.models.training import cpu_threads, predict_proba

    tc = tc.model_copy(update={"seed": seed})
    test = np.flatnonzero(data.is_test)
    truth = data.codes[test]
    started = time.monotonic()
    with cpu_threads("cpu", tc.cpu_threads or 1):
        state = pretrain_encoder(data, tc, "cpu")["state"] if tc.pretrain_epochs else None
        model = train_classifier(data, tc, "cpu", state).model
    print(f"seed {seed}: network trained in {time.monotonic() - started:.0f} s", file=sys.stderr)
    date_tc = tc.model_copy(
        update={"baseline_features": "temporal", "baseline_model": "random_forest"}
    )
    forests = {}
    for name, btc in (("baseline", tc), ("date_indexed_rf", date_tc)):
        features = baseline_features(data, btc)
        forests[name] = (
            fit_baseline(features[data.train_idx], data.codes[data.train_idx], btc),
            btc,
        )
    out: dict[str, dict[int, dict]] = {
        "network": {}, "baseline": {}, "date_indexed_rf": {}, "network_calendar": {}
    }  # fmt: skip
    classes = np.asarray(model.spec.classes)
    for days in shifts:
        moved, effective = shifted(data, days)
        proba = predict_proba(model, moved.x.subset(test), 8192, "cpu")
        out["network"][days] = {
            **scores(truth, classes[proba.argmax(1)], model.spec.classes), "days": effective
        }  # fmt: skip
        back, found = calendar_aligned(model, moved, data.labelled[test], seed)
        proba = predict_proba(model, back.x.subset(test), 8192, "cpu")
        out["network_calendar"][days] = {
            **scores(truth, classes[proba.argmax(1)], model.spec.classes), "days": effective,
            "estimated_shift_days": found,
        }  # fmt: skip
        for name, (forest, btc) in forests.items():
            features = baseline_features(moved, btc)[test]
            s = scores(truth, forest.predict(features), model.spec.classes)
            out[name][days] = {**s, "days": effective}
    return out


def main(args: list[str] | None = None) -> list[dict]:
    from pivotmap.config import load_run_config
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="infra/configs/flanders.yaml")
    p.add_argument("--out", default="out/bench-flanders")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shifts", default="-30,-15,0,15,30", help="days, comma-separated")
    p.add_argument("--epochs", type=int, help="override train.epochs (default: the config's)")
    a = p.parse_args(args)
    config, out = load_run_config(a.config), Path(a.out).resolve()
    build_cube(config, out)
    data, tc = load(config, out, **({"epochs": a.epochs} if a.epochs else {}))
    seeds = [int(s) for s in a.seeds.split(",")]
    shifts = [int(s) for s in a.shifts.split(",")]
    per_seed = [run_seed(data, tc, seed, shifts) for seed in seeds]
    lines = []
    for model in per_seed[0]:
        for days in shifts:
            runs = [r[model][days] for r in per_seed]
            line = {"config": config.name, "model": model, "shift_days": days,
                    "effective_days": runs[0]["days"], "seeds": seeds,
                    **({"estimated_shift_days": [r["estimated_shift_days"] for r in runs]}
                       if "estimated_shift_days" in runs[0] else {}),
                    "step_days": step_days(data.table.doy),
                    "n_test_pixels": int(data.is_test.sum())}  # fmt: skip
            for key in ("overall_accuracy", "macro_f1"):
                values = [r[key] for r in runs]
                line[key] = values
                line[f"{key}_mean"] = round(float(np.mean(values)), 4)
                line[f"{key}_std"] = round(float(np.std(values)), 4)
            print(json.dumps(line), flush=True)
            lines.append(line)
    print(f"{'model':<17}{'shift':>6}{'OA mean':>9}{'±':>7}{'F1 mean':>9}{'±':>7}", file=sys.stderr)
    for line in lines:
        print(
            f"{line['model']:<17}{line['effective_days']:>6}{line['overall_accuracy_mean']:>9.3f}"
            f"{line['overall_accuracy_std']:>7.3f}{line['macro_f1_mean']:>9.3f}"
            f"{line['macro_f1_std']:>7.3f}",
            file=sys.stderr,
        )
    return lines


if __name__ == "__main__":
    main()
