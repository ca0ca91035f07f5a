"""The training data module: the training table drawn by the sample stage (`tasks/sampling.py`)
read back as network inputs, raw series for the baseline, its split, and unlabelled inputs.

Training never reads the cube: the table holds the sampled pixels' int16 series, so memory is
set by the sampling quotas (`train.max_*_pixels`), not by the region or its labelled area. The
table stays int16 (2 bytes a value); network inputs (float32, two more channels) are built batch
by batch (`Inputs`), and the normalisation and the baseline's features channel by channel or
chunk by chunk, so no float copy of the whole table is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pivotmap.models.features import channel_statistics, network_input
from pivotmap.models.network import ModelSpec
from pivotmap.results import SampleResult
from pivotmap.tasks import storage
from pivotmap.tasks.cube import decode_codes

if TYPE_CHECKING:
    from pivotmap.config import RunConfig, TrainConfig
    from pivotmap.tasks.workspace import Workspace


class TrainingDataError(ValueError):
    """Too few labelled pixels or classes to train and evaluate a model."""


@dataclass(frozen=True)
class TrainingData:
    """The labelled pixels (network inputs built per batch), their split, and unlabelled inputs."""

    spec: ModelSpec  # with normalisation fitted on the training pixels
    table: Table
    labelled: np.ndarray  # [N] rows of `table` with a class
    x: Inputs  # [N, T, C'] network inputs of the labelled pixels
    codes: np.ndarray  # [N] class codes
    is_test: np.ndarray  # [N] in a held-out group
    train_idx: np.ndarray  # indices of the labelled pixels used for training
    x_unlabelled: Inputs  # [U, T, C'] pixels outside held-out blocks, labels unused

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.spec.classes)}
        return np.array([index[c] for c in self.codes], dtype=np.int64)

    def series(self, index: np.ndarray) -> np.ndarray:
        """[n, T, C] raw series (NaN = missing) of labelled pixels `index`, for the baseline."""
        return self.table.decoded(self.spec.channels[:-2], self.labelled[index])


@dataclass(frozen=True)
class Inputs:
    """Network inputs [N, T, C'] of some table rows, built from the int16 codes when indexed
    (a batch, a slice, a subset): what training, pretraining and evaluation read."""

    table: Table
    rows: np.ndarray  # rows of `table`
    spec: ModelSpec

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), int(self.table.series.shape[1]), len(self.spec.channels))

    def __getitem__(self, index) -> np.ndarray:
        rows = self.rows[np.asarray(index) if not isinstance(index, slice) else index]
        many = np.atleast_1d(rows)
        series = self.table.decoded(self.spec.channels[:-2], many)
        out = network_input(series, self.table.doy[many], self.spec)
        return out if np.ndim(rows) else out[0]

    def subset(self, index: np.ndarray) -> Inputs:
        return replace(self, rows=self.rows[index])

    def join(self, other: Inputs) -> Inputs:
        """These rows, then `other`'s (of the same table)."""
        if other.table is not self.table:
            raise ValueError("inputs of different tables cannot be joined")
        return replace(self, rows=np.concatenate([self.rows, other.rows]))


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Table:
    """Rows of one or more training tables (several runs: regions, years)."""

    series: np.ndarray  # [N, T, C] int16 codes of `channels`
    doy: np.ndarray  # [N, T] day of year of each step
    codes: np.ndarray  # [N] class code (0 = unlabelled)
    split: np.ndarray  # [N] 'train' | 'test' | 'unlabelled'
    channels: tuple[str, ...]
    scales: dict[str, float]
    fill: int
    source: np.ndarray | None = None  # [N] which gathered table (0 = the run's own) each row is

    def decoded(self, names: tuple[str, ...], rows: np.ndarray) -> np.ndarray:
        """[n, T, len(names)] float32 of `rows` (NaN = missing): what the cube reader gives."""
        out = np.empty((len(rows), self.series.shape[1], len(names)), dtype=np.float32)
        for c, name in enumerate(names):
            k = self.channels.index(name)
            out[:, :, c] = decode_codes(self.series[rows, :, k], self.scales[name], self.fill)
        return out


def samples_of(ws: Workspace) -> list[SampleResult]:
    """The run's own training table, then those of the runs in `train.include`."""
    own = ws.read_result(SampleResult)
    others = []
    for root in ws.config.train.include:
        from pivotmap.tasks.workspace import Workspace as _Ws

        other = _Ws(root=storage.normalise(root), config=ws.config).find_result(SampleResult)
        if other is None:
            raise TrainingDataError(
                f"train.include: {root} holds no training table (reports/sample.json): run "
                f"`pivotmap sample --config ITS_CONFIG --out {root}` first"
            )
        others.append(other)
    check_same_cubes([own, *others], [ws.root, *ws.config.train.include])
    return [own, *others]


def check_same_cubes(samples: list[SampleResult], roots: list[str]) -> None:
    """Tables drawn from cubes gap-filled otherwise cannot train one model: a clear error naming
    the run and both settings (tables written before the settings were kept are not checked)."""
    own = samples[0].pivot_settings
    for sample, root in zip(samples[1:], roots[1:], strict=True):
        theirs = sample.pivot_settings
        differ = {k: (theirs[k], own[k]) for k in own.keys() & theirs.keys() if own[k] != theirs[k]}
        if differ:
            said = ", ".join(
                f"pivot.{k}={a} there, {b} here" for k, (a, b) in sorted(differ.items())
            )
            raise TrainingDataError(
                f"train.include: the table of {root} was drawn from a cube filled otherwise "
                f"({said}): rebuild its pivot with this run's settings and sample it again"
            )


def read_tables(samples: list[SampleResult]) -> Table:
    """Every row of the tables' Parquet files; their channels and time steps must agree. Each
    file becomes numpy arrays before the next is read (one Arrow copy at a time)."""
    import io
    import json

    import pyarrow.parquet as pq

    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("series", "doy", "class", "split")}
    sources: list[np.ndarray] = []
    meta = None
    for number, sample in enumerate(samples):
        for url in sample.files:
            table = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=list(columns))
            info = json.loads(table.schema.metadata[b"pivotmap"])
            if meta is None:
                meta = info
            elif (info["channels"], info["n_steps"]) != (meta["channels"], meta["n_steps"]):
                raise TrainingDataError(
                    f"training table {url} has {info['n_steps']} steps of {info['channels']}; "
                    f"{samples[0].files[0]} has {meta['n_steps']} of {meta['channels']}: "
                    "tables gathered by `train.include` need the same period length and step_days"
                )
            if table.num_rows:
                sources.append(np.full(table.num_rows, number, dtype=np.int16))
                for name, parts in columns.items():
                    chunk = table.column(name).combine_chunks()
                    parts.append(
                        chunk.flatten().to_numpy()
                        if name in ("series", "doy")
                        else chunk.to_numpy(zero_copy_only=False)
                    )
            del table
    if meta is None or not columns["class"]:
        raise TrainingDataError("the training table is empty: no labelled pixel with data")
    n_steps, channels = int(meta["n_steps"]), tuple(meta["channels"])
    return Table(
        series=_concatenate(columns["series"]).reshape(-1, n_steps, len(channels)),
        doy=_concatenate(columns["doy"]).reshape(-1, n_steps),
        codes=_concatenate(columns["class"]),
        split=np.asarray(_concatenate(columns["split"]), dtype=str),
        channels=channels,
        scales={k: float(v) for k, v in meta["scales"].items()},
        fill=int(meta["fill"]),
        source=_concatenate(sources),
    )


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """One array of `parts`, emptied as it goes (no second copy of the whole table)."""
    out = np.concatenate(parts)
    parts.clear()
    return out


def stratified_sample(codes: np.ndarray, max_total: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `max_total` samples shared between classes as the sample
    stage shares its quotas (`tasks.sampling.class_targets`)."""
    from pivotmap.tasks.sampling import class_targets

    classes, counts = np.unique(codes, return_counts=True)
    targets = class_targets(
        {int(c): int(n) for c, n in zip(classes, counts, strict=True)}, max_total
    )
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(codes == c))[: targets[int(c)]] for c in classes]
    return np.sort(np.concatenate(picks)) if picks else np.arange(0)


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


# ---------------------------------------------------------------------------- network inputs
def prepare_data(config: RunConfig, table: Table) -> TrainingData:
    """Fit the normalisation on the training rows; inputs are then built per batch."""
    tc = config.train
    labelled = np.flatnonzero(table.split != "unlabelled")
    codes = table.codes[labelled]
    classes = tuple(int(c) for c in np.unique(codes))
    if len(classes) < 2:
        raise TrainingDataError(f"the training table holds {len(classes)} class(es): two needed")
    base = ModelSpec(
        classes=classes, step_days=tc.step_days, hidden=tc.hidden, modalities=tc.modalities,
        summary=tc.summary_token,
    )  # fmt: skip
    is_test, trains = held_out(table, labelled, tc.holdout_table())
    if not is_test.any() or not trains.any():
        raise TrainingDataError(
            "the training table has no held-out or no training pixels: more groups are needed "
            "(smaller `train.block_size` or more reference polygons)"
            if tc.holdout is None
            else f"train.holdout {tc.holdout}: its table or the others have no labelled pixel"
        )
    spec = fit_table_normalisation(table, labelled[trains], base).replace(
        n_steps=int(table.series.shape[1]), season=table_season(table, tc.seed)
    )
    train_idx = np.flatnonzero(trains)
    train_idx = train_idx[label_subset(codes[train_idx], tc.label_fraction, tc.seed)]
    unlabelled = np.flatnonzero(table.split == "unlabelled")
    pool = np.concatenate([unlabelled, labelled[trains]])  # labels unused for pretraining
    pool = pool[np.random.default_rng(tc.seed).permutation(len(pool))[: tc.max_unlabelled_pixels]]
    return TrainingData(
        spec=spec,
        table=table,
        labelled=labelled,
        x=Inputs(table, labelled, spec),
        codes=codes,
        is_test=is_test,
        train_idx=train_idx,
        x_unlabelled=Inputs(table, pool, spec),
    )


def held_out(
    table: Table, labelled: np.ndarray, holdout: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(is_test, trains) over the labelled rows. Spatial blocks (the sample stage's split) when
    `holdout` is None; else every labelled row of gathered table `holdout` is held out and the
    other tables' training rows train (their held-out blocks are used by neither)."""
    split = table.split[labelled]
    if holdout is None:
        return split == "test", split != "test"
    if table.source is None:
        raise TrainingDataError("train.holdout: the training table does not say its rows' runs")
    held = table.source[labelled] == holdout
    return held, ~held & (split == "train")


def table_season(table: Table, seed: int, pixels: int = 4096) -> tuple[float, ...]:
    """The training region's season (`calendar.season_profile`) on up to `pixels` of the
    table's unlabelled pixels (drawn at random over the region, as predict draws its own), or
    of all its rows when it has too few; () without B04 and B08."""
    from pivotmap.models.calendar import MIN_PIXELS, season_profile

    names = tuple(c for c in ("B04", "B08") if c in table.channels)
    rows = np.flatnonzero(table.split == "unlabelled")
    rows = rows if len(rows) >= MIN_PIXELS else np.arange(len(table.codes))
    rows = np.sort(np.random.default_rng(seed).permutation(rows)[:pixels])
    profile = season_profile(table.decoded(names, rows), names) if len(names) == 2 else None
    return () if profile is None else tuple(round(float(v), 5) for v in profile)


def fit_table_normalisation(table: Table, rows: np.ndarray, spec: ModelSpec) -> ModelSpec:
    """`features.fit_normalisation` on table rows, one channel decoded at a time."""
    mean, std = {}, {}
    for name in (*spec.s2_channels, *spec.s1_channels):
        if not name.startswith("age_"):
            values = table.decoded((name,), rows)
            mean[name], std[name] = channel_statistics(values)
    return ModelSpec(**{**spec.to_dict(), "norm_mean": mean, "norm_std": std})


# ---------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augment:
    """Calendar augmentation of a training batch of network inputs [n, T, C']: each pixel's
    season shifted by up to ±`shift_steps` steps and stretched by a factor in 1 ± `stretch`
    (its day-of-year channels stay, so the network sees the same pattern at other dates), then
    a share `dropout` of its dates dropped per modality (value 0, age 1: as never observed)."""

    shift_steps: float
    stretch: float
    dropout: float
    s2_width: int  # S2 bands + age_s2 come first, then S1 bands + age_s1, then sin/cos doy
    s1_width: int

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, t, _ = x.shape
        out = np.array(x, dtype=np.float32, copy=True)
        series = self.s2_width + self.s1_width
        if self.shift_steps or self.stretch:
            shift = rng.uniform(-self.shift_steps, self.shift_steps, (n, 1))
            factor = 1 + rng.uniform(-self.stretch, self.stretch, (n, 1))
            centre = (t - 1) / 2
            source = centre + (np.arange(t)[None, :] - centre) / factor - shift
            source = np.clip(np.rint(source), 0, t - 1).astype(np.int64)
            out[:, :, :series] = x[np.arange(n)[:, None], source, :series]
        if self.dropout:
            for start, width in ((0, self.s2_width), (self.s2_width, self.s1_width)):
                if width < 2:
                    continue
                dropped = rng.random((n, t)) < self.dropout
                bands = out[:, :, start : start + width - 1]
                bands[dropped] = 0.0
                out[:, :, start + width - 1][dropped] = 1.0
        return out


def augmentation(tc: TrainConfig, spec: ModelSpec) -> Augment | None:
    """The configured training augmentation (`train.augment_*`), or None when it is off."""
    if not (tc.augment_shift_days or tc.augment_stretch or tc.augment_dropout):
        return None
    return Augment(
        shift_steps=tc.augment_shift_days / spec.step_days,
        stretch=tc.augment_stretch,
        dropout=tc.augment_dropout,
        s2_width=len(spec.s2_channels),
        s1_width=len(spec.s1_channels),
    )
