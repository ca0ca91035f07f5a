"""Pre-flight checks: everything a run will need, validated in seconds before any pixel is read.

Each check is a plain function of the run config (and the run folder) that returns what it
found, or raises an error naming the input and what to do; `run_checks` turns them into rows
(`Check`) and never stops at the first failure, so one `pivotmap check` lists every problem.
Which checks a stage needs is `STAGE_CHECKS`: a stage command runs only those.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pivotmap.tasks import storage

if TYPE_CHECKING:
    from pivotmap.config import RunConfig

CheckFn = Callable[["RunConfig", str | None], str]


class SkipCheck(Exception):
    """A check that does not apply to this config (e.g. no model URI set); its message says why."""


@dataclass(frozen=True)
class Check:
    """One check's outcome: `status` is 'ok', 'failed' or 'skipped'; `detail` is what was found,
    or the error naming the input and what to do."""

    name: str
    status: str
    detail: str
    seconds: float

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict:
        return asdict(self)


def run_checks(
    config: RunConfig, out_dir: str | None, checks: Mapping[str, CheckFn]
) -> list[Check]:
    """Run every check in order; a failure is a row, not an exception."""
    rows = []
    for name, fn in checks.items():
        started = time.monotonic()
        try:
            status, detail = "ok", fn(config, out_dir)
        except SkipCheck as why:
            status, detail = "skipped", str(why)
        except Exception as exc:  # every input error becomes its row
            status, detail = "failed", one_line(exc)
        rows.append(Check(name, status, detail, round(time.monotonic() - started, 2)))
    return rows


def one_line(exc: BaseException) -> str:
    """An error as one line: its type and its message with whitespace collapsed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------- the checks


def check_region(config: RunConfig, out_dir: str | None = None) -> str:
    """The region lies on the grid: at least one tile."""
    tiles = _tiles(config)
    if not tiles:
        raise ValueError(
            "the region covers no tile of the grid — check `region` (bbox and its crs) "
            "against `grid` (crs, origin, extent)"
        )
    g, r = config.grid, config.region
    found = ""
    if r.place is not None:  # what the name resolved to, and its namesakes
        from pivotmap.tasks.gazetteer import resolve_place

        found = "; " + resolve_place(r.place, r.place_radius_km).describe()
    return (
        f"{len(tiles)} tiles of {g.tile_size} px at {g.resolution:g} m ({g.crs}), "
        f"{config.period.start}..{config.period.end}{found}"
    )


def check_catalogue(config: RunConfig, out_dir: str | None = None) -> str:
    """The catalogue answers and holds each configured collection; a static catalogue also
    has items in the region and period (a STAC API is asked for one)."""
    from pivotmap.tasks.region import tiles_lonlat
    from pivotmap.tasks.stac_source import SourceError, ccw_geojson, item_source, open_api

    src, period = config.source, config.period
    source = item_source(src)  # request headers from the environment, href modifier
    region = tiles_lonlat(_tiles(config))
    found = []
    client = open_api(src.url, source.settings) if src.kind == "api" else None
    for collection in (c for c in (src.s2_collection, src.s1_collection) if c):
        if client is None:
            items = source.find(collection, region, period.start, period.end).items
            count = f"{len(items)} items"
        else:
            if client.get_collection(collection) is None:
                raise SourceError(
                    f"collection {collection!r} not found in STAC API {src.url} — check "
                    "`source.*_collection`"
                )
            search = client.search(
                collections=[collection], intersects=ccw_geojson(region), max_items=1,
                datetime=f"{period.start.isoformat()}/{period.end.isoformat()}T23:59:59Z",
            )  # fmt: skip
            items = list(search.items())
            count = "items" if items else "0 items"
        if not items:
            raise SourceError(
                f"no items of {collection!r} in {src.url} intersect the region between "
                f"{period.start} and {period.end} — check `region`, `period` and the collection id"
            )
        found.append(f"{collection}: {count}")
    return f"{src.kind} {src.url} ({'; '.join(found)} in region and period)"


def check_labels(config: RunConfig, out_dir: str | None = None) -> str:
    """The nomenclature and every label source are readable, their codes known, and their
    bounds overlap the region."""
    from pivotmap.tasks.labels import check_labels as check_sources
    from pivotmap.tasks.nomenclature import load_nomenclature

    if config.labels is None:
        raise ValueError(
            "no `labels` in the config: training needs reference labels and a nomenclature — "
            "add `labels`, or set `predict.model_uri` to map with a registered model"
        )
    nomenclature = load_nomenclature(config.labels.nomenclature)
    extent = config.grid.spec().union_geobox(_tiles(config))
    rows = check_sources(config.labels, extent, nomenclature)
    sources = ", ".join(f"{r['url']} ({r['kind']}, classes {r['classes']})" for r in rows)
    return f"{len(nomenclature.codes)} classes in {config.labels.nomenclature}; {sources}"


def check_output(config: RunConfig, out_dir: str | None) -> str:
    """The run folder (and `publish.target`, when set) can be written: a probe file is
    written, read back and removed."""
    if out_dir is None:
        raise SkipCheck("no --out given: the run folder is not checked")
    places = [storage.normalise(str(out_dir))]
    if config.publish.target:
        places.append(storage.normalise(config.publish.target))
    for place in places:
        _probe(place)
    return ", ".join(places) + " writable"


def _probe(folder: str) -> None:
    """Write, read back and remove a small file in `folder`; a local folder that did not
    exist is removed again (checking creates nothing)."""
    created = None if storage.is_remote(folder) else _first_missing(Path(folder))
    probe = storage.join(folder, f".pivotmap-check-{uuid.uuid4().hex[:8]}")
    try:
        storage.makedirs(folder)
        storage.write_text(probe, "pivotmap check")
        if storage.read_text_or_none(probe) != "pivotmap check":
            raise storage.StorageError(f"{probe} did not read back what was written")
    except (OSError, storage.StorageError) as exc:
        hint = (
            "check AWS_ENDPOINT_URL, the credentials and the bucket"
            if storage.is_remote(folder)
            else "choose a folder you can write to (--out, publish.target)"
        )
        raise PermissionError(f"cannot write to {folder}: {one_line(exc)} — {hint}") from exc
    finally:
        with contextlib.suppress(OSError, storage.StorageError):
            storage.remove_tree(storage.normalise(str(created)) if created else probe)


def _first_missing(path: Path) -> Path | None:
    """The top-most folder of `path` that does not exist yet (None: it exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def needs_result(stage: str) -> CheckFn:
    """A check that the run folder holds the result of an earlier `stage` (else: which
    command to run first)."""

    def check(config: RunConfig, out_dir: str | None) -> str:
        from pivotmap.results import STAGE_RESULTS
        from pivotmap.tasks.workspace import Workspace

        if out_dir is None:
            raise SkipCheck(f"no --out given: the {stage} result is not looked for")
        ws = Workspace(root=storage.normalise(str(out_dir)), config=config)
        ws.read_result(STAGE_RESULTS[stage])  # StageNotRun names the command to run first
        return f"{ws.report_url(f'{stage}.json')} found"

    check.__name__ = f"needs_{stage}"
    return check


def _tiles(config: RunConfig):
    from pivotmap.tasks.region import region_geometry

    r = config.region
    geom = region_geometry(**r.model_dump())  # its keywords are RegionConfig's fields
    return config.grid.spec().tiles_for_geometry(geom)


# What each stage needs before it starts (the model check lives in flows/check.py: tasks do
# not import models). `check` runs every input check.
INPUT_CHECKS: dict[str, CheckFn] = {
    "region": check_region,
    "catalogue": check_catalogue,
    "labels": check_labels,
    "output": check_output,
}
STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "ingest": ("region", "catalogue", "output"),
    "pivot": ("region", "output", "ingest"),
    "sample": ("region", "labels", "output", "pivot"),
    "train": ("labels", "output", "pivot", "sample"),
    "predict": ("region", "output", "pivot"),
    "publish": ("output", "predict"),
}


def checks_for(stage: str) -> dict[str, CheckFn]:
    """The input and earlier-result checks of `stage`, in order."""
    names = STAGE_CHECKS[stage]
    return {n: INPUT_CHECKS[n] if n in INPUT_CHECKS else needs_result(n) for n in names}
