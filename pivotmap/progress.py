"""Progress for long loops: a bar on the terminal (stderr) and, inside a Prefect flow run, a
progress artifact in the UI. Nothing is drawn when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
UPDATE_EVERY_S = 2.0  # at most one API call per loop this often; the last step always lands


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, drawing a progress bar on stderr when it is a terminal."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    items = _prefect_progress(items, description, total)
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


def _prefect_progress(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """Pass `items` through, keeping a Prefect progress artifact (percent) up to date."""
    artifact = _start_artifact(description, total)
    if artifact is None or not total:
        yield from items
        return
    from prefect.artifacts import update_progress_artifact

    last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        if done == total or time.monotonic() - last >= UPDATE_EVERY_S:
            update_progress_artifact(artifact, progress=100.0 * done / total)
            last = time.monotonic()


def _start_artifact(description: str, total: int | None):
    """A new progress artifact at 0 %, inside a flow run with a known total; else None."""
    if not total:
        return None
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress=0.0, description=f"{description}: {total} steps")
