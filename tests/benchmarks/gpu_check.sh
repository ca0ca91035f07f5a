#!/usr/bin/env bash
# GPU check (issue 14): on a machine with a CUDA GPU, generate a synthetic region, train with CUDA
# (bf16 autocast, models/training.py) and predict through dask-cuda's LocalCUDACluster
# (tasks/cluster.py), then report px/s as JSON in $OUT/gpu_check.json (and on stdout).
#
# Not run by the test suite. One prepared run for a lent GPU machine, under 8 minutes:
#   bash tests/benchmarks/gpu_check.sh          # OUT=folder for the results (default gpu-check-out)
# It measures through tests/benchmarks/bench_scale.py (one CLI process per stage, peak memory per
# process) and writes the measured rates (predict_gpu, train_gpu, …) to $OUT/rates.json, which
# `pivotmap plan --rates $OUT/rates.json` reads.
#
# Python, first that works: $PIVOTMAP_PYTHON; .venv (from `make setup`, then
# `.venv/bin/pip install -c requirements.lock -e ".[gpu]"`); .venv-gpu; else it makes .venv-gpu on
# the machine's own Python and torch (--system-site-packages): from a wheelhouse in .whl/ when
# there is one (machines without network), else from the package index.
#
# Environment: GPU_CHECK_SIZE (TILESxTILE_PX, default 2x256 = 262 k px), GPU_CHECK_START/END
# (default the year 2023), GPU_CHECK_BUDGET_S (default 450: every step is cut to what is left),
# GPU_CHECK_OVERRIDES (config overrides as JSON; default bench_scale's fast training).
# It fails loudly (exit 1, the failed step named in $OUT/gpu_check.json) and never hangs: every
# step runs under `timeout`.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
SIZE=${GPU_CHECK_SIZE:-2x256}
START=${GPU_CHECK_START:-2023-01-01}
END=${GPU_CHECK_END:-2023-12-31}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1

fail() {
    echo "gpu_check: FAILED: $*" >&2
    printf '{"ok": false, "error": "%s"}\n' "${*//\"/\'}" >"$OUT/gpu_check.json"
    exit 1
}

# step LIMIT_S CMD...: run CMD under a timeout cut to the time left; fail naming it otherwise.
step() {
    local limit=$1 left=$((DEADLINE - SECONDS))
    shift
    ((left > 15)) || fail "out of time before: $*"
    ((limit < left)) || limit=$left
    echo "gpu_check: $* (at most ${limit} s)" >&2
    local rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    ((rc == 0)) || fail "exit $rc ($([ $rc -ge 124 ] && echo 'timed out' || echo 'error')) in: $*"
}

works() { [ -x "$1" ] && timeout 120 "$1" -c "import pivotmap.flows.cli, torch, dask_cuda" 2>/dev/null; }

PY=${PIVOTMAP_PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python .venv-gpu/bin/python; do
        if works "$candidate"; then PY=$candidate && break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no Python with pivotmap, torch and dask_cuda: making .venv-gpu" >&2
    step 60 python3 -m venv --system-site-packages .venv-gpu
    PIP=(.venv-gpu/bin/python -m pip install -q --disable-pip-version-check)
    if [ -d .whl ]; then PIP+=(--no-index --find-links .whl); fi
    grep -v -E '^(torch|nvidia-|triton)' requirements.lock >"$OUT/requirements-gpu.txt"
    step 300 "${PIP[@]}" -r "$OUT/requirements-gpu.txt" "dask-cuda[cu12]==26.10.0"
    step 120 "${PIP[@]}" --no-deps --no-build-isolation --ignore-requires-python -e .
    PY=.venv-gpu/bin/python
    works "$PY" || fail "$PY cannot import pivotmap, torch and dask_cuda after setup"
fi

step 120 "$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BENCH=(tests/benchmarks/bench_scale.py --sizes "$SIZE" --start "$START" --end "$END"
    --stages ingest,pivot,sample,train,predict --work "$WORK" --rates-out "$OUT/rates.json")
if [ -n "${GPU_CHECK_OVERRIDES:-}" ]; then BENCH+=(--overrides "$GPU_CHECK_OVERRIDES"); fi
# bench_scale skips `sample` by itself where the CLI has no such stage.
left=$((DEADLINE - SECONDS - 20))
((left > 60)) || fail "out of time before the benchmark"
rc=0
timeout --kill-after=10 "$left" "$PY" "${BENCH[@]}" | tee "$OUT/bench.jsonl" || rc=$?
((rc == 0)) || fail "bench_scale exit $rc ($([ $rc -ge 124 ] && echo 'timed out' || echo 'error')); see $OUT/bench.jsonl"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()
        if line.startswith('{"size"')]
by = {r["stage"]: r for r in rows}
devices = {s: by[s].get("device") for s in ("train", "predict") if s in by}
result = {
    "ok": all(d == "cuda" for d in devices.values()) and len(devices) == 2,
    "size": rows[0]["size"] if rows else None, "pixels": rows[0]["pixels"] if rows else None,
    "devices": devices,
    "predict_px_per_s": by.get("predict", {}).get("px_per_s"),
    "predict_seconds": by.get("predict", {}).get("seconds"),
    "predict_peak_rss_mb_per_worker": by.get("predict", {}).get("peak_rss_mb_per_worker"),
    "train_seconds": by.get("train", {}).get("seconds"),
    "stages": {r["stage"]: {"seconds": r["seconds"], "px_per_s": r["px_per_s"]} for r in rows},
}
if not result["ok"]:
    result["error"] = f"train and predict must both run on cuda, ran on {devices}"
(out / "gpu_check.json").write_text(json.dumps(result))
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
EOF
