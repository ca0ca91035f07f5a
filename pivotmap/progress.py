"""Progress for long loops and for a run's stages, where operators look: a bar on the terminal
(stderr, when it is a terminal), `progress …` log lines (every LOG_EVERY_S seconds, and every
tenth of a long loop: done/total, rate, px/s, ETA; a loop over within seconds logs nothing) and, inside a Prefect flow run, a progress artifact whose
percentage and description move while the loop runs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pivotmap.runtime import kv, run_logger

T = TypeVar("T")
UPDATE_EVERY_S = 2.0  # at most one API call per loop this often; the last step always lands
LOG_EVERY_S = 10.0  # a log line at least this often while steps finish
MANY_STEPS = 100  # loops of this many steps or more also log every tenth


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    size: Callable[[T], int | None] | None = None,
) -> Iterator[T]:
    """Yield `items`, showing progress on the terminal, in the log and in the Prefect UI.

    `size(item)` gives the pixels a step covers (for px/s); by default `item_pixels` reads the
    steps of the tile loops (predict tile jobs, ingest batches, finished futures' results).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    items = _reported(items, Rate(description, total), size or item_pixels)
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield from progress.track(items, total=total, description=description)


@dataclass
class Rate:
    """Steps and pixels done since `started`, and what they say about the rest."""

    description: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    pixels: int = 0
    failed: int = 0

    def step(self, pixels: int | None) -> None:
        self.done += 1
        self.pixels += pixels or 0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def eta_s(self) -> float | None:
        if not self.total or not self.done:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)

    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    def fields(self) -> dict[str, Any]:
        """The figures of a `progress` log line."""
        elapsed = max(self.elapsed_s, 1e-9)
        out: dict[str, Any] = {"stage": self.description, "done": self.done}
        out["total"] = self.total if self.total is not None else "?"
        out["percent"] = round(self.percent(), 1)
        out["steps_per_s"] = round(self.done / elapsed, 3)
        if self.pixels:
            out["px_per_s"] = round(self.pixels / elapsed)
        if self.failed:
            out["failed"] = self.failed
        eta = self.eta_s()
        out["elapsed"] = duration_text(self.elapsed_s)
        out["eta"] = duration_text(eta) if eta is not None else "?"
        return out

    def summary(self) -> str:
        """One line for people, e.g. `12/50 · 1.2 Mpx/s · ETA 3 min`."""
        parts = [f"{self.done}/{self.total if self.total is not None else '?'}"]
        if self.pixels:
            parts.append(f"{rate_text(self.pixels / max(self.elapsed_s, 1e-9))}px/s")
        if self.failed:
            parts.append(f"{self.failed} failed")
        eta = self.eta_s()
        parts.append("done" if self.total and self.done >= self.total else
                     f"ETA {duration_text(eta)}" if eta is not None else "ETA ?")  # fmt: skip
        return " · ".join(parts)


def _reported(items: Iterable[T], rate: Rate, size: Callable[[T], int | None]) -> Iterator[T]:
    """Pass `items` through, logging and keeping a Prefect progress artifact up to date."""
    log = run_logger("progress")
    artifact = _start_artifact(rate.description, rate.total)
    rate.started = time.monotonic()  # the loop's time, not Prefect's import
    # Long loops log every tenth too; short ones (done within LOG_EVERY_S) stay out of the log.
    tenth = (rate.total or 0) // 10 if (rate.total or 0) >= MANY_STEPS else 0
    last_log = last_update = time.monotonic()
    logged = False
    for item in items:
        failure = _failure(item)
        if failure is not None:
            rate.failed += 1
            log.warning(kv("progress.failed", stage=rate.description, error=failure))
        pixels = None if failure is not None else _size(size, item)
        yield item
        rate.step(pixels)  # a step is done when the loop comes back for the next one
        now, last = time.monotonic(), rate.done == rate.total
        if (
            now - last_log >= LOG_EVERY_S
            or (tenth and rate.done % tenth == 0)
            or (last and (logged or rate.failed > 0))
        ):
            log.info(kv("progress", **rate.fields()))
            last_log, logged = now, True
        if artifact is not None and (last or now - last_update >= UPDATE_EVERY_S):
            _update_artifact(artifact, rate)
            last_update = now


def _size(size: Callable[[T], int | None], item: T) -> int | None:
    try:
        return size(item)
    except Exception:  # a step whose size cannot be read still counts as a step
        return None


def item_pixels(item: Any) -> int | None:
    """Pixels of one step of the tile loops: a tile job (`rows`/`cols` spans), a batch of
    (tile, block) pairs (ingest), a finished Dask future or a `(index, result)` pair whose
    result holds `pixels`; None for anything else."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
        item = item[1]
    if isinstance(item, dict):
        return item.get("pixels")
    rows, cols = getattr(item, "rows", None), getattr(item, "cols", None)
    if isinstance(rows, tuple) and isinstance(cols, tuple):
        return (rows[1] - rows[0]) * (cols[1] - cols[0])
    if getattr(item, "status", None) == "finished" and hasattr(item, "result"):
        result = item.result()
        return result.get("pixels") if isinstance(result, dict) else None
    if isinstance(item, list) and item and isinstance(item[0], tuple):
        return sum(block.grid.tile_size**2 for _, block in item)
    return None


def _failure(item: Any) -> str | None:
    """The error of a Dask future that failed, as it arrives; None otherwise."""
    if getattr(item, "status", None) != "error" or not hasattr(item, "exception"):
        return None
    try:
        exc = item.exception()
    except Exception as err:  # the scheduler went away: say so rather than hide it
        exc = err
    return f"{type(exc).__name__}: {exc}"


def _start_artifact(description: str, total: int | None):
    """A new progress artifact at 0 %, inside a flow run with a known total; else None."""
    if not total:
        return None
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress=0.0, description=f"{description}: 0/{total}")


def _update_artifact(artifact, rate: Rate) -> None:
    from prefect.artifacts import update_progress_artifact

    description = f"{rate.description}: {rate.summary()}"
    update_progress_artifact(artifact, progress=rate.percent(), description=description)


def duration_text(seconds: float | None) -> str:
    """`42 s`, `3.5 min`, `2.1 h`."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def rate_text(per_s: float) -> str:
    """`850 `, `12.3 k`, `1.2 M` (a unit follows)."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= limit:
            return f"{per_s / limit:.1f} {suffix}"
    return f"{per_s:.0f} "


# ---------------------------------------------------------------------------- a run's stages
@dataclass
class StageProgress:
    """The stages of a parent run (produce) as they start and finish: a `stage` log line as
    each ends (with the stage's and the run's elapsed time; Prefect logs each start), a
    progress artifact (stages done of
    planned, the current stage in its description) and a markdown table of the stages so far,
    updated in place (a new version of one artifact key)."""

    run: str
    planned: Sequence[str]
    key: str | None = None
    started: float = field(default_factory=time.monotonic)
    rows: list[dict] = field(default_factory=list)
    artifact: Any = None

    def __post_init__(self) -> None:
        from prefect.context import FlowRunContext

        self.in_flow = FlowRunContext.get() is not None
        if self.in_flow:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(
                progress=0.0, description=self._description("starting")
            )

    def run_stage(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` as stage `name`, reported before and after (and on failure)."""
        log = run_logger("produce")
        index = len(self.rows) + 1
        row: dict[str, Any] = {"stage": name, "status": "running", "seconds": None}
        self.rows.append(row)
        self._show(f"running {name} ({index}/{len(self.planned)})")
        t0 = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            row.update(status="failed", seconds=round(time.monotonic() - t0, 1))
            log.error(kv("stage", run=self.run, stage=name, status="failed",
                         elapsed=duration_text(row["seconds"]), error=type(exc).__name__))  # fmt: skip
            self._show(f"{name} failed after {duration_text(row['seconds'])}")
            raise
        row.update(status="done", seconds=round(time.monotonic() - t0, 1))
        log.info(kv("stage", run=self.run, stage=name, status="done",
                    step=f"{index}/{len(self.planned)}", elapsed=duration_text(row["seconds"]),
                    run_elapsed=self._elapsed()))  # fmt: skip
        following = self._next()
        self._show(f"{name} done; next {following}" if following else "all stages done")
        return result

    def markdown(self) -> str:
        """The stages so far and those still to run, as a markdown table."""
        lines = [
            f"# Stages of `{self.run}`",
            "",
            "| # | stage | status | time |",
            "|---|---|---|---|",
        ]
        for i, row in enumerate(self.rows, 1):
            took = duration_text(row["seconds"]) if row["seconds"] is not None else "…"
            lines.append(f"| {i} | {row['stage']} | {row['status']} | {took} |")
        for i, name in enumerate(self.planned[len(self.rows) :], len(self.rows) + 1):
            lines.append(f"| {i} | {name} | waiting | |")
        lines += ["", f"Elapsed: {self._elapsed()}."]
        return "\n".join(lines) + "\n"

    def percent(self) -> float:
        done = sum(r["status"] == "done" for r in self.rows)
        return 100.0 * done / max(len(self.planned), 1)

    def _next(self) -> str | None:
        rest = self.planned[len(self.rows) :]
        return rest[0] if rest else None

    def _elapsed(self) -> str:
        return duration_text(time.monotonic() - self.started)

    def _description(self, now: str) -> str:
        return f"{self.run}: {now} · elapsed {self._elapsed()}"

    def _show(self, now: str) -> None:
        if not self.in_flow:
            return
        from prefect.artifacts import create_markdown_artifact, update_progress_artifact

        update_progress_artifact(
            self.artifact, progress=self.percent(), description=self._description(now)
        )
        if self.key:
            create_markdown_artifact(
                self.markdown(), key=self.key, description=f"stages of {self.run}"
            )
