"""The training data module: labels on the grid, their spatial split and sampling, and the pixels
read from the pivot cube, ready for the network, the baseline and pretraining."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pivotmap.models.features import (
    day_of_year,
    fit_normalisation,
    has_data,
    network_input,
    raw_series,
)
from pivotmap.models.network import ModelSpec
from pivotmap.tasks.cube import PivotReader
from pivotmap.tasks.labels import UNKNOWN, read_labels

if TYPE_CHECKING:
    from pivotmap.config import LabelsConfig, RunConfig, TrainConfig
    from pivotmap.tasks.nomenclature import Nomenclature
    from pivotmap.tasks.workspace import Workspace


class TrainingDataError(ValueError):
    """Too few labelled pixels or classes to train and evaluate a model."""


@dataclass(frozen=True)
class TrainingData:
    """Network inputs and raw series of the labelled pixels, their split, and unlabelled inputs."""

    spec: ModelSpec  # with normalisation fitted on the training pixels
    series: np.ndarray  # [N, T, C] raw labelled series (NaN = missing), for the baseline
    x: np.ndarray  # [N, T, C'] network inputs of the labelled pixels
    codes: np.ndarray  # [N] class codes
    is_test: np.ndarray  # [N] in a held-out block
    train_idx: np.ndarray  # indices of the labelled pixels used for training
    x_unlabelled: np.ndarray  # [U, T, C'] pixels outside held-out blocks, labels unused

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.spec.classes)}
        return np.array([index[c] for c in self.codes], dtype=np.int64)


# ---------------------------------------------------------------------------- labels and split
def labels_config(config: RunConfig) -> LabelsConfig:
    """The run's `labels` section; a clear error when the config has none."""
    if config.labels is None:
        raise TrainingDataError(
            f"config {config.name!r} has no `labels` section: training needs reference data"
        )
    return config.labels


def labels(ws: Workspace, nomenclature: Nomenclature) -> np.ndarray:
    """Class codes on the region's extent (UNKNOWN where none); at least two classes."""
    url = labels_config(ws.config).url
    codes = read_labels(url, ws.extent(), nomenclature)
    if len(np.unique(codes[codes != UNKNOWN])) < 2:
        raise TrainingDataError(f"labels {url} hold fewer than two classes inside the region")
    return codes


def spatial_block_split(
    labels: np.ndarray, block: int, test_fraction: float, seed: int, unknown: int = UNKNOWN
) -> np.ndarray:
    """Boolean test mask: whole `block`×`block` squares are held out, so no neighbouring pixel
    of a test pixel trains the model. Draws are repeated (seeded) until every class with labels
    in at least two blocks appears on both sides."""
    h, w = labels.shape
    by, bx = np.arange(h) // block, np.arange(w) // block
    block_id = by[:, None] * (bx.max() + 1) + bx[None, :]
    labelled = labels != unknown
    blocks = np.unique(block_id[labelled])
    n_test = max(1, round(len(blocks) * test_fraction))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labelled])
    best = None
    for _ in range(200):
        test_blocks = rng.choice(blocks, size=n_test, replace=False)
        test = np.isin(block_id, test_blocks) & labelled
        train = ~np.isin(block_id, test_blocks) & labelled
        missing = sum(
            not (labels[test] == c).any() or not (labels[train] == c).any() for c in classes
        )
        if best is None or missing < best[0]:
            best = (missing, test)
        if missing == 0:
            break
    assert best is not None  # set by the first of the 200 draws
    return best[1]


def held_out_area(test_mask: np.ndarray, block: int) -> np.ndarray:
    """Every pixel of a block holding a test pixel: unlabelled data is never taken from there."""
    h, w = test_mask.shape
    by, bx = -(-h // block), -(-w // block)
    padded = np.zeros((by * block, bx * block), dtype=bool)
    padded[:h, :w] = test_mask
    blocks = padded.reshape(by, block, bx, block).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, block, 0), block, 1)[:h, :w]


def stratified_sample(codes: np.ndarray, max_total: int, seed: int) -> np.ndarray:
    """Indices of at most `max_total` samples shared equally between classes; a class smaller
    than its share is taken whole and its unused share goes to the others (water filling)."""
    if len(codes) <= max_total:
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(codes, return_counts=True)
    picks, remaining = [], max_total
    for rank, k in enumerate(np.argsort(counts, kind="stable")):
        take = min(counts[k], remaining // (len(classes) - rank))
        picks.append(rng.permutation(np.flatnonzero(codes == classes[k]))[:take])
        remaining -= take
    return np.sort(np.concatenate(picks))


def label_subset(
    codes: np.ndarray, fraction: float, seed: int, min_per_class: int = 2
) -> np.ndarray:
    """Indices of a random `fraction` of the labelled samples, per class (at least
    `min_per_class` of each class when it has them): the few-label setting."""
    if fraction >= 1:
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        take = min(len(members), max(min_per_class, round(fraction * len(members))))
        picks.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picks))


# ---------------------------------------------------------------------------- pixels
def read_pixels(
    ws: Workspace,
    labels: np.ndarray,
    excluded: np.ndarray,
    channels: tuple[str, ...],
    tc: TrainConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw series and codes of the labelled pixels, their flat indices in the extent, a seeded
    sample of unlabelled pixels with data outside `excluded`, and the days of year."""
    tiles = ws.tiles()
    extent = ws.extent(tiles)
    reader = PivotReader(ws.pivot_url)
    rng = np.random.default_rng(tc.seed)
    wanted = tc.pretrain_epochs or tc.distill_epochs
    quota = -(-tc.max_unlabelled_pixels // len(tiles)) if wanted else 0
    flat_index = np.arange(labels.size).reshape(labels.shape)
    xs, ys, where, unl, doy = [], [], [], [], None
    for tile in tiles:
        rows, cols = tile.slices_in(extent)
        tile_labels, tile_excluded = labels[rows, cols].ravel(), excluded[rows, cols].ravel()
        keep = tile_labels != UNKNOWN
        if not keep.any() and not quota:
            continue
        ds = reader.window(rows, cols, step_days=tc.step_days)
        doy, series = day_of_year(ds), raw_series(ds, channels)
        xs.append(series[keep])
        ys.append(tile_labels[keep])
        where.append(flat_index[rows, cols].ravel()[keep])
        free = np.flatnonzero(~keep & ~tile_excluded & has_data(series))
        unl.append(series[rng.permutation(free)[:quota]])
    if not xs or not sum(len(c) for c in ys):
        raise TrainingDataError(
            "no labelled pixel inside the region: check `labels.url` and `region`"
        )
    assert doy is not None  # set with the first tile that filled `xs`
    x, y, flat, x_unlabelled = (np.concatenate(a) for a in (xs, ys, where, unl))
    return x, y, flat, x_unlabelled, doy


def prepare_data(ws: Workspace, labels: np.ndarray, test_mask: np.ndarray) -> TrainingData:
    """Read the pixels, fit the normalisation on the training pixels, build network inputs."""
    tc = ws.config.train
    classes = tuple(int(c) for c in np.unique(labels[labels != UNKNOWN]))
    base = ModelSpec(
        classes=classes, step_days=tc.step_days, hidden=tc.hidden, modalities=tc.modalities
    )
    excluded = held_out_area(test_mask, tc.block_size)
    series, codes, flat, unlabelled, doy = read_pixels(ws, labels, excluded, base.channels[:-2], tc)
    is_test = test_mask.ravel()[flat]
    spec = fit_normalisation(series[~is_test], base).replace(n_steps=int(series.shape[1]))
    train_idx = np.flatnonzero(~is_test)
    train_idx = train_idx[stratified_sample(codes[train_idx], tc.max_train_pixels, tc.seed)]
    train_idx = train_idx[label_subset(codes[train_idx], tc.label_fraction, tc.seed)]
    pool = np.concatenate([unlabelled, series[~is_test]])  # labels unused for pretraining
    pool = pool[np.random.default_rng(tc.seed).permutation(len(pool))[: tc.max_unlabelled_pixels]]
    return TrainingData(
        spec=spec,
        series=series,
        x=network_input(series, doy, spec),
        codes=codes,
        is_test=is_test,
        train_idx=train_idx,
        x_unlabelled=network_input(pool, doy, spec),
    )
