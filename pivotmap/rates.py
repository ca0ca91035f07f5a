"""Measured rates that `pivotmap plan` turns into cost estimates, each with where it came from.

A plan is only as good as its rates, so every rate names its run: which benchmark, which region,
which machine and when. The figures below are the first ones measured (2026-12-01), on the 2
shared cores of the development machine (x86-64, 24 GB, no GPU), on synthetic regions made by
`tasks/synthetic.generate_demo_region` (2023, S2 every 5 days = 73 dates, S1 every 6 = 61):

- stage times: issue 14's table, 2 × 2 tiles of 256 px (262 144 px), one CLI command per stage;
  core-seconds = wall seconds × 2 cores (the stage's threads or Dask workers used both);
- train: the same table's 16 k px row (132 s; the demo's `train.cpu_threads: 1`, so 1 core) per
  training pixel-epoch (15 epochs × 3 000 px + 2 pretraining epochs × 2 000 px);
- predict kernel: `tests/benchmarks/bench_predict.py` (steady state of one warm worker), kept for
  reference; the plan uses the whole predict stage, which the issue measured 16× slower;
- bytes: `du` of a `pivotmap demo` run folder (2 × 2 tiles of 64 px, 365 days) and of its
  synthetic catalogue.

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


_ISSUE = "issue 14 table, 262k px (2x2 tiles of 256 px, 365 days), 2 shared cores, 2026-12-01"
_TRAIN = "issue 14 table, 16k px demo (2x2 tiles of 64 px), train 132 s on 1 thread, 2026-12-01"
_DEMO = "du of a `pivotmap demo` run folder (2x2 tiles of 64 px, 365 days, synthetic), 2026-12-01"
_DATA = "du of the demo's synthetic catalogue (2x2 tiles of 64 px, 365 days), 2026-12-01"
_NONE = "not measured yet: run tests/benchmarks/bench_scale.py (or gpu_check.sh on a GPU)"

RATES: Mapping[str, Rate] = MappingProxyType(
    {
        # Throughput, per core-second (per GPU-second for the *_gpu rates).
        "ingest": Rate(161_134.0, "pixel-dates per core-second", _ISSUE + ": 109 s"),
        "pivot": Rate(211_687.0, "pixel-days per core-second", _ISSUE + ": 226 s"),
        "sample": Rate(None, "pixels per core-second", _NONE),
        "train": Rate(0.002694, "core-seconds per training pixel-epoch", _TRAIN),
        "predict": Rate(376_703.0, "pixel-days per core-second", _ISSUE + ": 127 s"),
        "predict_kernel": Rate(
            6_233_470.0,
            "pixel-days per core-second",
            "tests/benchmarks/bench_predict.py: 17 078 px/s/core at 365 days, one warm worker, "
            "2 shared cores, 2026 (reference only: excludes stage start-up and products)",
        ),
        "publish": Rate(3_745.0, "pixels per core-second", _ISSUE + ": 35 s"),
        "train_gpu": Rate(None, "GPU-seconds per training pixel-epoch", _NONE),
        "predict_gpu": Rate(None, "pixel-days per GPU-second", _NONE),
        # Storage, compressed, as written.
        "obs_bytes_s2": Rate(1.089, "bytes per S2 observed value", _DEMO + ": obs_s2.zarr"),
        "obs_bytes_s1": Rate(1.263, "bytes per S1 observed value", _DEMO + ": obs_s1.zarr"),
        "pivot_bytes": Rate(0.498, "bytes per pivot value (pixel x day x variable)", _DEMO),
        "products_bytes": Rate(12.83, "bytes per pixel of published products", _DEMO),
        # Inputs, when the catalogue gives no `file:size`.
        "input_bytes_s2": Rate(9.46, "bytes of S2 COGs read per pixel-date (11 assets)", _DATA),
        "input_bytes_s1": Rate(2.36, "bytes of S1 COGs read per pixel-date (VV, VH)", _DATA),
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
