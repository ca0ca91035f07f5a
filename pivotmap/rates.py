"""Measured rates that `pivotmap plan` turns into cost estimates, each with where it came from.

A plan is only as good as its rates, so every rate names its run: which benchmark, which region,
which machine and when. The figures below were measured on 2026-12-01 (pivot and predict on
2026-12-02, after the changes named in their source) by
`tests/benchmarks/bench_scale.py --sizes 1x128,4x128,8x128` on the 2 shared cores of the
development machine (x86-64, 24 GB, no GPU), on synthetic regions made by
`tasks/synthetic.generate_demo_region` (2023, S2 every 5 days = 73 dates, S1 every 6 = 61), with
the default settings (fast training aside): stage rates are the marginal cost from 262 k to 1 M
pixels (core-seconds = wall seconds × 2 cores), so a stage's start-up (10-20 s: Prefect, Dask)
is left out, as it is for a country; storage is what the 1 M px run wrote. The predict kernel
(`tests/benchmarks/bench_predict.py`, one warm worker) is kept for reference. GPU rates are not
measured until a GPU machine runs `tests/benchmarks/gpu_check.sh`.

Regenerate them with `tests/benchmarks/bench_scale.py --rates-out FILE`, which writes this
mapping as JSON (`{name: {value, unit, source}}`); `pivotmap plan --rates FILE` uses such a file
instead of these defaults, and its values and sources replace those below to make them the default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class Rate:
    """One measured rate: `value` in `unit` (None: not measured yet), and the run it came from."""

    value: float | None
    unit: str
    source: str


_BENCH = (
    "tests/benchmarks/bench_scale.py --sizes 1x128,4x128,8x128 (synthetic, 365 days, default "
    "settings but fast training), 2 shared cores, 2026-12-01"
)
_MARGINAL = _BENCH + ": marginal cost from 262k to 1M px (no start-up)"
_MARGINAL_1202 = (
    "tests/benchmarks/bench_scale.py --sizes 1x128,4x128,8x128 (synthetic, 365 days, default "
    "settings but fast training), 2 shared cores, quiet, 2026-12-02 (pivot zstd level 3, predict "
    "workers keeping freed memory): marginal cost from 262k to 1M px (no start-up)"
)
_TRAIN = _BENCH + ": 1M px, train.cpu_threads 1 (1 core)"
_NONE = "not measured yet: run tests/benchmarks/gpu_check.sh on a GPU machine"

RATES: Mapping[str, Rate] = MappingProxyType(
    {
        # Throughput, per core-second (per GPU-second for the *_gpu rates).
        "ingest": Rate(1_713_527.0, "pixel-dates per core-second", _MARGINAL),
        "pivot": Rate(2_399_663.0, "pixel-days per core-second", _MARGINAL_1202),
        "sample": Rate(60_775.0, "pixels per core-second", _MARGINAL),
        "train": Rate(0.002391, "core-seconds per training pixel-epoch", _TRAIN),
        "predict": Rate(4_274_087.0, "pixel-days per core-second", _MARGINAL_1202),
        "predict_kernel": Rate(
            6_233_470.0,
            "pixel-days per core-second",
            "tests/benchmarks/bench_predict.py: 17 078 px/s/core at 365 days, one warm worker, "
            "2 shared cores, 2026 (reference only: the plan uses the whole stage's rate)",
        ),
        "publish": Rate(219_674.0, "pixels per core-second", _MARGINAL),
        "train_gpu": Rate(None, "GPU-seconds per training pixel-epoch", _NONE),
        "predict_gpu": Rate(None, "pixel-days per GPU-second", _NONE),
        # Storage, compressed, as written (the 1M px run).
        "obs_bytes_s2": Rate(1.05, "bytes per S2 observed value", _BENCH),
        "obs_bytes_s1": Rate(1.214, "bytes per S1 observed value", _BENCH),
        "pivot_bytes_linear": Rate(
            0.478, "bytes per pivot value (pixel x day x variable), pivot.method linear", _BENCH
        ),
        "pivot_bytes_nearest": Rate(
            0.251,
            "bytes per pivot value (pixel x day x variable), pivot.method nearest",
            "the linear rate x 0.526, the nearest/linear pivot bytes of "
            "tests/benchmarks/bench_pivot.py --size 256 (77.7 / 147.8 MB), 2026",
        ),
        "products_bytes": Rate(1.783, "bytes per pixel of published products", _BENCH),
        # Inputs, when the catalogue gives no `file:size`.
        "input_bytes_s2": Rate(10.33, "bytes of S2 COGs read per pixel-date (11 assets)", _BENCH),
        "input_bytes_s1": Rate(2.18, "bytes of S1 COGs read per pixel-date (VV, VH)", _BENCH),
    }
)


def rates_to_json(rates: Mapping[str, Rate]) -> str:
    """The rates as JSON, the format `load_rates` and `pivotmap plan --rates` read."""
    return json.dumps({k: asdict(v) for k, v in rates.items()}, indent=2, sort_keys=True)


def load_rates(path: str | Path | None = None) -> Mapping[str, Rate]:
    """The default rates, overridden by those in a JSON file (e.g. written by bench_scale)."""
    if path is None:
        return RATES
    try:
        raw = json.loads(Path(path).read_text())
        extra = {k: Rate(v["value"], v["unit"], v["source"]) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"cannot read rates file {path}: {exc} — expected {{name: {{value, unit, source}}}} "
            "as written by tests/benchmarks/bench_scale.py --rates-out"
        ) from exc
    return MappingProxyType({**RATES, **extra})
