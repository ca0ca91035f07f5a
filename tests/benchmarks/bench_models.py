"""Benchmark of the models on a real region (default: the Flanders patch, spatial block split).

Measures, on the held-out blocks of the train flow's split: the S1+S2 fusion network, the same
network on S2 only and on S1 only, the random-forest baseline, the few-label gain of
masked-reconstruction pretraining (a small share of the labelled training pixels, several
seeds), the distilled student's gap, parameters, FLOPs per pixel and CPU inference speed per
core. Builds the cube first (ingest + pivot flows) when `--out` has none.

    .venv/bin/python tests/benchmarks/bench_models.py --config infra/configs/flanders.yaml \
        --out out/bench-flanders

Prints a table, then one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def build_cube(config, out: Path) -> None:
    """Ingest and pivot, unless the cube and its report are already there."""
    if (out / "cube" / "pivot.zarr").exists() and (out / "reports" / "pivot.json").is_file():
        return
    from pivotmap.flows.ingest import ingest_flow
    from pivotmap.flows.pivot import pivot_flow

    ingest_flow(config, str(out))
    pivot_flow(config, str(out))


def load(config, out: Path, **overrides):
    """The train flow's data preparation: the sample stage's table (same split, pixels and
    normalisation as `pivotmap train`)."""
    from pivotmap.models.datamodule import prepare_data, read_tables
    from pivotmap.tasks.sampling import sample
    from pivotmap.tasks.workspace import Workspace

    config = config.model_copy(update={"train": config.train.model_copy(update=overrides)})
    ws = Workspace.open(config, out)
    return prepare_data(config, read_tables([sample(ws)])), config.train


def train_and_score(data, tc, init_state=None, modalities=None) -> tuple[dict, object]:
    """Fit a network on the data's training pixels; held-out scores and the model."""
    from pivotmap.models.trainer import evaluate
    from pivotmap.models.training import fit

    spec = data.spec if modalities is None else data.spec.replace(modalities=modalities)
    idx = data.train_idx
    started = time.monotonic()
    model = fit(
        data.x[idx],
        data.y[idx],
        spec,
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        learning_rate=tc.learning_rate,
        seed=tc.seed,
        init_state=init_state,
        init_lr_scale=tc.pretrain_lr_scale,
    ).model
    scores = evaluate(model, data, "cpu")
    scores["train_s"] = round(time.monotonic() - started, 1)
    return scores, model


def pretrained_state(data, tc) -> dict:
    from pivotmap.models.trainer import pretrain_encoder

    return pretrain_encoder(data, tc, "cpu")["state"]


def few_label_gain(
    data, tc, state: dict, fraction: float, seeds: list[int], epochs: int, lr_scale: float
) -> dict:
    """Scratch vs pretrained fine-tuning on `fraction` of the training labels (same split and
    pretrained encoder; one label draw per seed)."""
    from pivotmap.models.datamodule import label_subset

    rows = []
    for seed in seeds:
        pool = data.train_idx
        subset = replace(data, train_idx=pool[label_subset(data.codes[pool], fraction, seed)])
        run_tc = tc.model_copy(
            update={"seed": seed, "epochs": epochs, "pretrain_lr_scale": lr_scale}
        )
        scratch, _ = train_and_score(subset, run_tc)
        tuned, _ = train_and_score(subset, run_tc, init_state=state)
        rows.append(
            {
                "seed": seed,
                "labelled_pixels": len(subset.train_idx),
                "scratch": short(scratch),
                "pretrained": short(tuned),
            }
        )
    mean = {
        f"{arm}_{k}": round(float(np.mean([r[arm][k] for r in rows])), 4)
        for arm in ("scratch", "pretrained")
        for k in ("overall_accuracy", "macro_f1")
    }
    mean["macro_f1_gain"] = round(mean["pretrained_macro_f1"] - mean["scratch_macro_f1"], 4)
    mean["overall_accuracy_gain"] = round(
        mean["pretrained_overall_accuracy"] - mean["scratch_overall_accuracy"], 4
    )
    return {"label_fraction": fraction, "runs": rows, "mean": mean}


def short(scores: dict) -> dict:
    return {k: round(scores[k], 4) for k in ("overall_accuracy", "macro_f1", "kappa")}


def main(args: list[str] | None = None) -> dict:
    from pivotmap.config import load_run_config
    from pivotmap.models.evaluation import pixels_per_second_per_core
    from pivotmap.models.trainer import distil_student, evaluate, random_forest_baseline
    from pivotmap.runtime import apply_offline_defaults

    apply_offline_defaults()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="infra/configs/flanders.yaml")
    p.add_argument("--out", default="out/bench-flanders")
    p.add_argument("--fraction", type=float, default=0.05, help="few-label share")
    p.add_argument("--seeds", type=int, default=3, help="few-label repetitions")
    p.add_argument("--skip-few-label", action="store_true")
    p.add_argument("--few-label-epochs", type=int, default=150, help="epochs of the few-label runs")
    p.add_argument(
        "--few-label-lr-scale", type=float, default=0.1, help="pretrained encoder's relative lr"
    )
    p.add_argument("--epochs", type=int, help="override train.epochs (default: the config's)")
    p.add_argument("--pretrain-epochs", type=int, help="override train.pretrain_epochs")
    a = p.parse_args(args)
    config, out = load_run_config(a.config), Path(a.out).resolve()
    build_cube(config, out)
    overrides = {"epochs": a.epochs, "pretrain_epochs": a.pretrain_epochs}
    data, tc = load(config, out, **{k: v for k, v in overrides.items() if v is not None})
    result: dict = {"config": config.name, "n_steps": data.spec.n_steps}
    result["n_train_pixels"], result["n_test_pixels"] = len(data.train_idx), int(data.is_test.sum())
    started = time.monotonic()
    state = pretrained_state(
        data, tc.model_copy(update={"pretrain_epochs": tc.pretrain_epochs or 20})
    )
    result["pretrain_s"] = round(time.monotonic() - started, 1)
    result["fusion"], _ = train_and_score(data, tc)
    result["fusion_pretrained"], model = train_and_score(data, tc, init_state=state)
    result["s2_only"], _ = train_and_score(data, tc, modalities=("s2",))
    result["s1_only"], _ = train_and_score(data, tc, modalities=("s1",))
    result["random_forest"] = random_forest_baseline(data, tc)
    student_tc = tc.model_copy(update={"distill_epochs": tc.distill_epochs or tc.epochs})
    student = distil_student(data, model, student_tc, "cpu").model
    result["student"] = evaluate(student, data, "cpu")
    x = data.x[np.arange(min(len(data.x), 8192))]
    x = np.concatenate([x] * max(1, -(-8192 // len(x))))[:8192]
    result["fusion_pretrained"]["px_per_s_per_core"] = round(pixels_per_second_per_core(model, x))
    result["student"]["px_per_s_per_core"] = round(pixels_per_second_per_core(student, x))
    if not a.skip_few_label:
        result["few_label"] = few_label_gain(
            data,
            tc,
            state,
            a.fraction,
            list(range(a.seeds)),
            a.few_label_epochs,
            a.few_label_lr_scale,
        )
    print_table(result)
    print(json.dumps(result, default=float))
    return result


def print_table(r: dict) -> None:
    rows = [
        k
        for k in ("fusion_pretrained", "fusion", "s2_only", "s1_only", "random_forest", "student")
        if k in r
    ]
    print(
        f"{'model':<18}{'OA':>7}{'macroF1':>9}{'kappa':>7}{'params':>9}{'MFLOP/px':>10}{'px/s/core':>11}",
        file=sys.stderr,
    )
    for k in rows:
        s = r[k]
        flops = s.get("flops_per_pixel")
        print(
            f"{k:<18}{s['overall_accuracy']:>7.3f}{s['macro_f1']:>9.3f}{s['kappa']:>7.3f}"
            f"{s.get('parameters', '-'):>9}{(flops / 1e6 if flops else float('nan')):>10.2f}"
            f"{s.get('px_per_s_per_core', '-'):>11}",
            file=sys.stderr,
        )
    if "few_label" in r:
        print(f"few labels: {json.dumps(r['few_label']['mean'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
