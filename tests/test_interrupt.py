"""Ctrl-C during a run: the command stops within seconds, exits 130, says what a re-run keeps,
prints no traceback of a dead Prefect API, and the re-run resumes from the finished tiles.

The interrupt is sent as a terminal sends it: SIGINT to the whole foreground process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.procs import stop_group
from tests.small_runs import generate_small_region, write_small_config

pytestmark = pytest.mark.faults

STOP_WITHIN_S = 10.0  # from Ctrl-C to the "interrupted" line and to the exit (measured 1-2 s)
NOISE = ("Traceback", "Unable to connect", "ConnectError", "Error logging to API")


def _start(folder: Path, *args: str) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """`pivotmap ARGS` in its own process group (a terminal's foreground job); its stderr
    lines are collected with their arrival time."""
    exe = Path(sys.executable).with_name("pivotmap")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.Popen(
        [str(exe), *args], cwd=folder, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_for(lines: list[tuple[float, str]], text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not any(text in line for _, line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            tail = "\n".join(line for _, line in lines[-40:])
            pytest.fail(f"never saw {text!r} (exit {proc.returncode}):\n{tail}")
        time.sleep(0.05)


def _markers(out: Path, stage: str) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (out / "state" / stage).glob("*.json")}


def test_ctrl_c_during_training_stops_fast_and_the_rerun_resumes(tmp_path):
    generate_small_region(tmp_path / "data")
    config = write_small_config(tmp_path, "run.yaml", tmp_path / "mlflow.db")
    out = tmp_path / "out"
    argv = ["produce", "--config", str(config), "--out", str(out), "--json"]
    proc, lines = _start(tmp_path, *argv)
    _wait_for(lines, "train epoch 1/", proc)  # mid-training, the earlier stages finished
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        code = proc.wait(timeout=60)
    finally:
        stop_group(proc)
    elapsed = time.monotonic() - sent
    time.sleep(0.2)  # the reader thread drains the pipe
    err = "\n".join(line for _, line in lines)
    assert code == 130, err[-3000:]
    notes = [(t, line) for t, line in lines if line.startswith("pivotmap: interrupted")]
    assert len(notes) == 1, err[-3000:]
    stopped, note = notes[0][0] - sent, notes[0][1]
    assert stopped < STOP_WITHIN_S, f"took {stopped:.1f} s to stop:\n{err[-3000:]}"
    assert elapsed < STOP_WITHIN_S, f"took {elapsed:.1f} s to exit:\n{err[-3000:]}"
    assert "a re-run of the same command resumes" in note
    assert "pivot 4/4 tiles" in note and "sample 4/4 tiles" in note
    assert not [line for _, line in lines if any(n in line for n in NOISE)], err[-3000:]
    kept = {stage: _markers(out, stage) for stage in ("ingest-s2", "ingest-s1", "pivot")}
    assert all(len(m) == 4 for m in kept.values())

    rerun, rerun_lines = _start(tmp_path, *argv)
    try:
        assert rerun.wait(timeout=600) == 0, "\n".join(line for _, line in rerun_lines[-40:])
    finally:
        stop_group(rerun)
    assert rerun.stdout is not None
    summary = json.loads(rerun.stdout.read().strip().splitlines()[-1])
    assert summary["product_version"]
    assert (out / "products" / "catalog.json").is_file()
    for stage, before in kept.items():  # finished tiles reused, not redone
        assert _markers(out, stage) == before, stage


# What a run printed before (issue 18, point 3), each cut at its source: none may come back.
CHATTER = (
    "Traceback", "distributed.", "great_expectations", "Concurrency limits",
    "BLOCKSIZE", "Add type hints", "Port 8787", "NotGeoreferencedWarning",
)  # fmt: skip


@pytest.mark.slow
def test_a_whole_run_prints_progress_and_no_library_chatter(tmp_path):
    """`pivotmap produce` from the console: stage progress and the summary, no warnings,
    tracebacks or Dask/GX chatter (there were ≈ 120 warnings a demo)."""
    generate_small_region(tmp_path / "data")
    config = write_small_config(tmp_path, "run.yaml", tmp_path / "mlflow.db")
    argv = ["produce", "--config", str(config), "--out", str(tmp_path / "out")]
    proc, lines = _start(tmp_path, *argv)
    try:
        code = proc.wait(timeout=600)
    finally:
        stop_group(proc)
    time.sleep(0.2)  # the reader thread drains the pipe
    text = [line for _, line in lines]
    assert code == 0, "\n".join(text[-40:])
    noisy = [line for line in text if any(c in line for c in CHATTER)]
    assert not noisy, "\n".join(noisy)
    print("\n".join(line for line in text if "WARNING" in line))  # any other, for the log
    assert any("train epoch 3/3" in line for line in text)  # progress is still shown
    assert "pivotmap: done" in text and len(text) < 80, len(text)
