"""The sample stage: the training set as an artefact, drawn per tile, never over the whole region.

Two passes over the tiles, each a job per tile (local threads, or the Dask scheduler of
`dask.address`):

1. **count**: rasterise the tile's reference data (`tasks/labels.read_tile_labels`) and count
   labelled pixels per (group, class). A group is a polygon (vector labels) or, where labels
   have no polygon (rasters, points), a `train.block_size` block of the grid. The driver then
   holds out whole groups (`train.test_fraction` of them, seeded, redrawn until every class
   with labels in two groups is on both sides) and turns the counts into per-tile quotas:
   training pixels stratified by class (`train.max_train_pixels`, water filling: a class
   smaller than its share is taken whole), test pixels at one rate for every class (so overall
   accuracy is unbiased; `train.max_test_pixels`), unlabelled pixels for pretraining
   (`train.max_unlabelled_pixels`, never from a block that holds a test pixel).
2. **sample**: draw the tile's pixels (seeded by tile), read only them from the pivot cube as
   int16 codes, and write one Parquet file per tile under `training/`: the series (time-major
   codes of `CHANNELS`), days of year, class, weight, split, tile, group, region, period and the
   pixel's position.

The driver holds per-group counts, never pixels; each job holds one tile's labels and the
sampled pixels' series. The table's key names its inputs (cube version, labels, sampling
settings), so a re-run skips tiles already written with the same key.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pivotmap.results import PivotResult, SampleResult
from pivotmap.runtime import run_logger
from pivotmap.tasks import storage
from pivotmap.tasks.cube import FILL, VARIABLES, PivotReader
from pivotmap.tasks.sensors import S1_VARIABLES, S2_VARIABLES

if TYPE_CHECKING:
    import pyarrow as pa

    from pivotmap.config import RunConfig
    from pivotmap.tasks.grid import Tile
    from pivotmap.tasks.workspace import Workspace

STAGE = "sample"
# Every table holds all the cube's channels (a model picks the ones it reads by name).
CHANNELS: tuple[str, ...] = (*S2_VARIABLES, "age_s2", *S1_VARIABLES, "age_s1")
SPLITS = ("train", "test", "unlabelled")
_BLOCK_BITS = 28  # block keys pack (row, col) block indices in 2 × 28 bits, negated


class SamplingError(ValueError):
    """Too few labelled pixels or classes to draw a training set."""


# ---------------------------------------------------------------------------- pass 1: count
@dataclass(frozen=True)
class TileCounts:
    """Labelled pixels of one tile per (group, class)."""

    tile_id: str
    groups: np.ndarray  # int64 group keys
    classes: np.ndarray  # uint8 class codes
    counts: np.ndarray  # int64 pixels


def block_keys(tile: Tile, block: int) -> np.ndarray:
    """[h, w] negative int64 keys of the grid's `block`-pixel squares (global: tiles agree)."""
    n = tile.grid.tile_size
    gy = (-tile.iy - 1) * n + np.arange(n)  # rows grow southwards, tiles northwards
    gx = tile.ix * n + np.arange(n)
    mask = (1 << _BLOCK_BITS) - 1
    by, bx = (gy // block) & mask, (gx // block) & mask
    return -2 - ((by[:, None] << _BLOCK_BITS) | bx[None, :]).astype(np.int64)


def tile_groups(tile: Tile, group: np.ndarray, block: int) -> np.ndarray:
    """The split group of each pixel: its polygon, else its grid block."""
    return np.where(group >= 0, group, block_keys(tile, block))


def _tile_labels(config: RunConfig, tile: Tile):
    from pivotmap.tasks.labels import read_tile_labels
    from pivotmap.tasks.nomenclature import load_nomenclature

    labels = _labels(config)
    years = (config.period.start.year, config.period.end.year)
    return read_tile_labels(labels, tile.geobox, load_nomenclature(labels.nomenclature), years)


def count_tile(job: tuple[RunConfig, Tile]) -> TileCounts:
    """Pass 1 for one tile: labelled pixels per (group, class)."""
    from pivotmap.tasks.labels import UNKNOWN

    config, tile = job
    lab = _tile_labels(config, tile)
    keep = lab.codes != UNKNOWN
    groups = tile_groups(tile, lab.group, config.train.block_size)[keep]
    pairs = np.stack([groups, lab.codes[keep].astype(np.int64)])
    if not pairs.size:
        empty = np.zeros(0, dtype=np.int64)
        return TileCounts(tile.id, empty, empty.astype(np.uint8), empty)
    unique, counts = np.unique(pairs, axis=1, return_counts=True)
    return TileCounts(tile.id, unique[0], unique[1].astype(np.uint8), counts.astype(np.int64))


# ---------------------------------------------------------------------------- the driver's plan
def split_groups(
    groups: np.ndarray, classes: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
    """Test group keys: `test_fraction` of the groups, drawn (seeded) until every class with
    labels in at least two groups has pixels on both sides (or the best of 200 draws)."""
    keys, inverse = np.unique(groups, return_inverse=True)
    n_test = max(1, round(len(keys) * test_fraction))
    if len(keys) < 2:
        raise SamplingError(
            f"the labels form {len(keys)} group(s): a held-out test set needs at least two "
            "(smaller `train.block_size`, or more reference polygons)"
        )
    cls_values = np.unique(classes)
    # groups holding each class (a polygon holds one; a block may hold several)
    holders = {c: np.unique(inverse[classes == c]) for c in cls_values}
    need = [c for c in cls_values if len(holders[c]) >= 2]
    rng = np.random.default_rng(seed)
    best: tuple[int, np.ndarray] | None = None
    for _ in range(200):
        is_test = np.zeros(len(keys), dtype=bool)
        is_test[rng.permutation(len(keys))[:n_test]] = True
        missing = sum(is_test[holders[c]].all() or not is_test[holders[c]].any() for c in need)
        if best is None or missing < best[0]:
            best = (missing, is_test)
        if missing == 0:
            break
    assert best is not None
    return keys[best[1]]


def class_targets(counts: dict[int, int], max_total: int) -> dict[int, int]:
    """Pixels to take per class, at most `max_total` shared equally; a class smaller than its
    share is taken whole and its unused share goes to the others (water filling)."""
    if sum(counts.values()) <= max_total:
        return dict(counts)
    out, remaining = {}, max_total
    ordered = sorted(counts, key=lambda c: (counts[c], c))
    for rank, c in enumerate(ordered):
        out[c] = min(counts[c], remaining // (len(ordered) - rank))
        remaining -= out[c]
    return out


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over cells in proportion to `counts` (largest remainders; never above a
    cell's count): the per-tile quotas of one class."""
    counts = np.asarray(counts, dtype=np.int64)
    available = int(counts.sum())
    if total >= available:
        return counts.copy()
    exact = counts * (total / available)
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")[:rest]
    base[order] += 1
    return np.minimum(base, counts)


@dataclass(frozen=True)
class TilePlan:
    """What one tile contributes: quotas per class and split, its test groups, its share of
    unlabelled pixels."""

    tile_id: str
    train: dict[int, int]
    test: dict[int, int]
    unlabelled: int
    test_groups: np.ndarray


def plan_tiles(
    counted: list[TileCounts], test_groups: np.ndarray, config: RunConfig
) -> list[TilePlan]:
    """Per-tile quotas from the counts and the split."""
    tc = config.train
    rows = [
        (t, g, c, n) for t in counted for g, c, n in zip(t.groups, t.classes, t.counts, strict=True)
    ]
    tiles = [t.tile_id for t in counted]
    tile_index = {t: i for i, t in enumerate(tiles)}
    classes = sorted({int(c) for _, _, c, _ in rows})
    table = {s: np.zeros((len(tiles), len(classes)), dtype=np.int64) for s in ("train", "test")}
    test_set = set(test_groups.tolist())
    for t, g, c, n in rows:
        side = "test" if int(g) in test_set else "train"
        table[side][tile_index[t.tile_id], classes.index(int(c))] += int(n)
    train_totals = {c: int(table["train"][:, k].sum()) for k, c in enumerate(classes)}
    targets = class_targets(train_totals, tc.max_train_pixels)
    n_test = int(table["test"].sum())
    test_rate = min(1.0, tc.max_test_pixels / n_test) if n_test else 0.0
    quota = {s: np.zeros_like(table[s]) for s in table}
    for k, c in enumerate(classes):
        quota["train"][:, k] = allocate(table["train"][:, k], targets[c])
        quota["test"][:, k] = allocate(
            table["test"][:, k], round(test_rate * table["test"][:, k].sum())
        )
    m = tc.max_unlabelled_pixels  # an equal share per tile
    unl = allocate(np.full(len(tiles), m, dtype=np.int64), m)
    out = []
    for i, t in enumerate(counted):
        mine = t.groups[np.isin(t.groups, test_groups)]
        out.append(
            TilePlan(
                tile_id=t.tile_id,
                train={c: int(quota["train"][i, k]) for k, c in enumerate(classes) if quota["train"][i, k]},
                test={c: int(quota["test"][i, k]) for k, c in enumerate(classes) if quota["test"][i, k]},
                unlabelled=int(unl[i]),
                test_groups=np.unique(mine),
            )
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------- pass 2: sample
@dataclass(frozen=True)
class SampleJob:
    """Everything a worker needs for one tile: URLs and settings, no open handles."""

    config: RunConfig
    tile: Tile
    rows: slice  # the tile inside the pivot cube's extent
    cols: slice
    pivot_url: str
    table_url: str
    plan: TilePlan
    key: str


def _held_out(test_mask: np.ndarray, block: int) -> np.ndarray:
    """Every pixel of a tile block holding a test pixel: unlabelled pixels never come from there."""
    h, w = test_mask.shape
    by, bx = -(-h // block), -(-w // block)
    padded = np.zeros((by * block, bx * block), dtype=bool)
    padded[:h, :w] = test_mask
    blocks = padded.reshape(by, block, bx, block).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, block, 0), block, 1)[:h, :w]


def _draw(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    return candidates[rng.permutation(len(candidates))[:n]] if n else candidates[:0]


def sample_tile(job: SampleJob) -> dict:
    """Pass 2 for one tile: draw its pixels, read their series, write its Parquet file."""
    from pivotmap.tasks.labels import UNKNOWN

    config, tile, plan, tc = job.config, job.tile, job.plan, job.config.train
    lab = _tile_labels(config, tile)
    codes = lab.codes.ravel()
    groups = tile_groups(tile, lab.group, tc.block_size)
    is_test = np.isin(groups, plan.test_groups) & (lab.codes != UNKNOWN)
    excluded = (_held_out(is_test, tc.block_size) | (lab.codes != UNKNOWN)).ravel()
    seed = int.from_bytes(hashlib.sha256(f"{tc.seed}/{tile.id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    picks, split = [], []
    for name, quotas, side in (("train", plan.train, False), ("test", plan.test, True)):
        for c, n in sorted(quotas.items()):
            chosen = _draw(rng, np.flatnonzero((codes == c) & (is_test.ravel() == side)), n)
            picks.append(chosen)
            split += [name] * len(chosen)
    # unlabelled: oversample, then keep those with data once read
    spare = _draw(rng, np.flatnonzero(~excluded), 2 * plan.unlabelled)
    flat = np.concatenate([*picks, spare]).astype(np.int64)
    split_arr = np.array(split + ["unlabelled"] * len(spare), dtype=object)
    series, doy = read_series(job, flat, tc.step_days)
    with_data = (series != FILL).any(axis=(1, 2))
    keep = with_data.copy()
    unl = np.flatnonzero(split_arr == "unlabelled")
    keep[unl[with_data[unl]][plan.unlabelled :]] = False  # at most the quota
    flat, split_arr, series = flat[keep], split_arr[keep], series[keep]
    table = tile_table(job, flat, split_arr, series, doy, lab, groups.ravel())
    storage.write_bytes(job.table_url, parquet_bytes(table))
    counts = {s: int((split_arr == s).sum()) for s in SPLITS}
    return {"tile": tile.id, **counts, "without_data": int((~with_data[: len(split)]).sum())}


def read_series(job: SampleJob, flat: np.ndarray, step_days: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, T, C] int16 codes of `CHANNELS` at the tile pixels `flat` (FILL where missing or
    absent from the cube), and the days of year [T]; only these pixels are read."""
    from pivotmap.models.pivot_series import day_of_year

    reader = PivotReader(job.pivot_url)
    n = job.tile.grid.tile_size
    rows = job.rows.start + flat // n
    cols = job.cols.start + flat % n
    times = reader.times[::step_days]
    out = np.full((len(flat), len(times), len(CHANNELS)), FILL, dtype=np.int16)
    if len(flat):
        ds = reader.points(rows, cols, step_days=step_days, dtype="int16")
        for c, name in enumerate(CHANNELS):
            if name in ds:
                out[:, :, c] = ds[name].transpose("pixel", "time").values
    return out, day_of_year(times).astype(np.int16)


def tile_table(
    job: SampleJob,
    flat: np.ndarray,
    split: np.ndarray,
    series: np.ndarray,
    doy: np.ndarray,
    lab,
    groups: np.ndarray,
) -> pa.Table:
    """The tile's rows, with the table's metadata (channels, scales, shape, provenance)."""
    import pyarrow as pa

    n_rows, n_steps, n_channels = series.shape
    tile, config = job.tile, job.config
    x0, _, _, y1 = tile.bounds
    res = tile.grid.resolution
    r, c = flat // tile.grid.tile_size, flat % tile.grid.tile_size
    period = f"{config.period.start.isoformat()}/{config.period.end.isoformat()}"
    values = pa.array(series.reshape(-1), type=pa.int16())
    columns = {
        "series": pa.FixedSizeListArray.from_arrays(values, n_steps * n_channels),
        "doy": pa.FixedSizeListArray.from_arrays(
            pa.array(np.tile(doy, n_rows), type=pa.int16()), n_steps
        ),
        "class": pa.array(lab.codes.ravel()[flat], type=pa.uint8()),
        "weight": pa.array(lab.weight.ravel()[flat], type=pa.float32()),
        "split": pa.array(split.astype(str)).dictionary_encode(),
        "group": pa.array(groups[flat], type=pa.int64()),
        "tile": pa.array([tile.id] * n_rows).dictionary_encode(),
        "region": pa.array([config.name] * n_rows).dictionary_encode(),
        "period": pa.array([period] * n_rows).dictionary_encode(),
        "x": pa.array(x0 + (c + 0.5) * res, type=pa.float64()),
        "y": pa.array(y1 - (r + 0.5) * res, type=pa.float64()),
    }
    meta = {
        "channels": list(CHANNELS),
        "scales": {name: VARIABLES[name].scale for name in CHANNELS},
        "fill": FILL,
        "n_steps": n_steps,
        "step_days": config.train.step_days,
        "crs": tile.grid.crs,
        "key": job.key,
    }
    return pa.table(columns).replace_schema_metadata({"pivotmap": json.dumps(meta)})


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=4096)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the stage
def _labels(config: RunConfig):
    if config.labels is None:
        raise SamplingError(
            f"config {config.name!r} has no `labels` section: sampling a training set needs "
            "reference data"
        )
    return config.labels


def table_key(config: RunConfig, cube_version: str) -> str:
    """Names the table's inputs: a change of any of them draws a new table."""
    from pivotmap.tasks.labels import labels_fingerprint

    labels = _labels(config)
    tc = config.train
    # a region without a place keeps the key of the tables drawn before `region.place` existed
    unset = {"place", "place_radius_km"} if config.region.place is None else set()
    settings = {
        "cube": cube_version,
        "labels": labels_fingerprint(labels),
        "nomenclature": hashlib.sha256(storage.read_bytes(labels.nomenclature)).hexdigest(),
        "period": [config.period.start.isoformat(), config.period.end.isoformat()],
        "grid": config.grid.model_dump(mode="json"),
        "region": config.region.model_dump(mode="json", exclude=unset),
        **{
            k: getattr(tc, k)
            for k in (
                "step_days", "block_size", "test_fraction", "seed", "max_train_pixels",
                "max_test_pixels", "max_unlabelled_pixels",
            )
        },
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def pivot_settings(config: RunConfig) -> dict[str, str | int]:
    """How the sampled cube was gap-filled: series drawn from cubes filled otherwise differ, so
    `train.include` refuses to mix them."""
    return config.pivot.model_dump(include={"method", "max_hold_days", "age_cap_days"})


def table_url(ws: Workspace, key: str, tile_id: str) -> str:
    return ws.url("training", key, f"{tile_id}.parquet")


def sample(ws: Workspace, force: bool = False) -> SampleResult:
    """Count, split, plan and draw the training table of the run's region; kept in the run
    folder with its result (reports/sample.json)."""
    from pivotmap.tasks.cluster import map_tiles

    started = time.monotonic()
    from pivotmap.tasks.labels import check_labels
    from pivotmap.tasks.nomenclature import load_nomenclature

    config, log = ws.config, run_logger(STAGE)
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    labels = _labels(config)  # checked in seconds, before any cube is needed
    for row in check_labels(labels, extent, load_nomenclature(labels.nomenclature)):
        log.info("labels %s: %s", row["url"], {k: v for k, v in row.items() if k != "url"})
    pivot = ws.read_result(PivotResult)
    key = table_key(config, pivot.cube_version)
    address = config.dask.address
    counted = map_tiles(address, count_tile, [(config, t) for t in tiles], progress="count labels")
    labelled = [t for t in counted if len(t.groups)]
    if not labelled:
        raise SamplingError(
            f"no labelled pixel inside the region of {config.name!r}: check `labels` "
            "(sources, class column, year) and `region`"
        )
    groups = np.concatenate([t.groups for t in labelled])
    classes = np.concatenate([t.classes for t in labelled])
    if len(np.unique(classes)) < 2:
        raise SamplingError(
            f"the labels inside the region hold one class ({int(classes[0])}): training needs two"
        )
    test_groups = split_groups(groups, classes, config.train.test_fraction, config.train.seed)
    plans = {p.tile_id: p for p in plan_tiles(counted, test_groups, config)}
    if force:
        ws.clear_stage(STAGE)
    jobs, done = [], []
    for tile in tiles:
        if ws.is_done(STAGE, tile.id, key) and storage.exists(table_url(ws, key, tile.id)):
            done.append(tile.id)
            continue
        rows, cols = tile.slices_in(extent)
        jobs.append(
            SampleJob(config, tile, rows, cols, ws.pivot_url, table_url(ws, key, tile.id),
                      plans[tile.id], key)
        )  # fmt: skip
    written = map_tiles(
        address, sample_tile, jobs, progress=STAGE,
        on_done=lambda job, row: ws.mark_done(STAGE, job.tile.id, key, row),
    )  # fmt: skip
    rows_by_tile = {r["tile"]: r for r in written}
    for tile_id in done:
        rows_by_tile[tile_id] = {"tile": tile_id, **(ws.marker(STAGE, tile_id) or {})}
    totals = {s: sum(int(r.get(s, 0)) for r in rows_by_tile.values()) for s in SPLITS}
    result = SampleResult(
        table=ws.url("training", key),
        files=[table_url(ws, key, t.id) for t in tiles],
        key=key,
        cube_version=pivot.cube_version,
        n_groups=int(len(np.unique(groups))),
        n_test_groups=int(len(test_groups)),
        rows=totals,
        classes=sorted(int(c) for c in np.unique(classes)),
        tiles_written=[{k: v for k, v in r.items() if k != "key"} for r in written],
        tiles_already_done=done,
        duration_s=round(time.monotonic() - started, 2),
        pivot_settings=pivot_settings(config),
    )
    log.info(
        "training table %s: %d train, %d test, %d unlabelled pixels from %d tiles",
        key, totals["train"], totals["test"], totals["unlabelled"], len(tiles),
    )  # fmt: skip
    ws.write_result(result)
    return result
