"""The sample stage's planning: group split, class quotas, per-tile allocation, grid blocks."""

import numpy as np
import pytest
import yaml

from pivotmap.models.datamodule import stratified_sample
from pivotmap.tasks.grid import GridSpec
from pivotmap.tasks.sampling import (
    TileCounts,
    allocate,
    block_keys,
    class_targets,
    plan_tiles,
    split_groups,
)


def test_split_holds_out_whole_groups_with_every_class_on_both_sides():
    rng = np.random.default_rng(0)
    groups = np.arange(40)
    classes = np.where(groups < 30, 1, 2).astype(np.uint8)  # class 2 in 10 groups only
    rng.shuffle(classes)
    test = split_groups(groups, classes, test_fraction=0.25, seed=3)
    assert len(test) == 10 and len(set(test.tolist())) == 10
    is_test = np.isin(groups, test)
    for c in (1, 2):
        assert is_test[classes == c].any() and (~is_test[classes == c]).any()
    # seeded: the same inputs give the same split, another seed another one
    assert np.array_equal(test, split_groups(groups, classes, 0.25, seed=3))
    assert not np.array_equal(test, split_groups(groups, classes, 0.25, seed=4))


def test_a_group_holding_several_classes_stays_on_one_side():
    # a block holding two classes is one group: it appears twice in the (group, class) rows
    groups = np.array([1, 1, 2, 3, 4, 5, 6, 7])
    classes = np.array([1, 2, 1, 2, 1, 2, 1, 2], dtype=np.uint8)
    test = split_groups(groups, classes, test_fraction=0.3, seed=0)
    assert len(test) == round(7 * 0.3)
    assert set(test.tolist()) <= set(groups.tolist())


def test_class_targets_cap_the_total_and_keep_rare_classes_whole():
    targets = class_targets({1: 1000, 2: 50, 3: 500}, 600)
    assert targets == {2: 50, 1: 275, 3: 275}
    assert class_targets({1: 10, 2: 20}, 600) == {1: 10, 2: 20}


def test_allocate_is_proportional_exact_and_never_above_a_count():
    counts = np.array([0, 10, 30, 60])
    quota = allocate(counts, 50)
    assert quota.sum() == 50 and (quota <= counts).all()
    assert quota.tolist() == [0, 5, 15, 30]
    assert allocate(counts, 1000).tolist() == counts.tolist()
    odd = allocate(np.array([1, 1, 1]), 2)
    assert odd.sum() == 2 and odd.max() == 1


def test_stratified_sample_uses_the_same_quotas_as_the_sample_stage():
    codes = np.array([1] * 1000 + [2] * 50 + [3] * 500)
    idx = stratified_sample(codes, 600, seed=0)
    picked = np.bincount(codes[idx])
    assert len(idx) == 600 and picked[2] == 50 and picked[1] == picked[3] == 275
    assert len(set(idx.tolist())) == len(idx)


def test_block_keys_are_global_so_neighbouring_tiles_agree():
    grid = GridSpec(crs="EPSG:32631", resolution=10, tile_size=32, origin_x=0, origin_y=0)
    a, b = block_keys(grid.tile(0, 0), 16), block_keys(grid.tile(1, 0), 16)
    below = block_keys(grid.tile(0, -1), 16)
    assert (a < -1).all() and len(np.unique(a)) == 4  # 2 × 2 blocks of 16 px, none NO_GROUP
    assert not set(a.ravel()) & set(b.ravel()) and not set(a.ravel()) & set(below.ravel())
    # a block size that does not divide the tile: blocks continue across the tile edge
    c, d = block_keys(grid.tile(0, 0), 24), block_keys(grid.tile(1, 0), 24)
    assert c[0, 31] == d[0, 0] and c[0, 0] != c[0, 31]


def test_plan_gives_per_tile_quotas_that_add_up():
    from pivotmap.config import TrainConfig

    counted = [
        TileCounts("A", np.array([1, 2, 3]), np.array([1, 1, 2], np.uint8), np.array([400, 400, 100])),
        TileCounts("B", np.array([4, 5]), np.array([2, 1], np.uint8), np.array([300, 200])),
        TileCounts("C", np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64)),
    ]  # fmt: skip

    class Config:  # only what the planner reads
        train = TrainConfig(max_train_pixels=500, max_test_pixels=100, max_unlabelled_pixels=300)

    plans = {p.tile_id: p for p in plan_tiles(counted, np.array([2, 5]), Config())}  # type: ignore[arg-type]
    train = {c: sum(p.train.get(c, 0) for p in plans.values()) for c in (1, 2)}
    assert train == {1: 250, 2: 250}  # class 1 has 400 train pixels, class 2 has 400: 250 each
    test = {c: sum(p.test.get(c, 0) for p in plans.values()) for c in (1, 2)}
    assert test == {1: 100, 2: 0}  # one rate (100 of 600) for every class: unbiased accuracy
    assert plans["A"].test_groups.tolist() == [2] and plans["B"].test_groups.tolist() == [5]
    assert sum(p.unlabelled for p in plans.values()) == 300 and plans["C"].unlabelled == 100


# ---------------------------------------------------------------------------- the stage, for real
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 2 × 2-tile (32 px) demo region, ingested and pivoted on a short period."""
    from pivotmap.flows.demo import prepare_demo
    from pivotmap.tasks.ingest import ingest
    from pivotmap.tasks.pivot import build_pivot
    from pivotmap.tasks.workspace import Workspace

    folder = tmp_path_factory.mktemp("sample")
    config, path = prepare_demo(
        folder, tiles=2, tile_size=32, start="2023-04-01", end="2023-06-30",
        overrides={"train": {"max_train_pixels": 600, "max_test_pixels": 300,
                             "max_unlabelled_pixels": 200, "block_size": 8}},
    )  # fmt: skip
    ws = Workspace.open(config, folder / "run")
    ingest(ws)
    build_pivot(ws)
    return ws, path


@pytest.mark.slow
def test_sample_stage_draws_a_table_by_group_and_reads_only_the_cube(small_run):
    import pyarrow.parquet as pq

    from pivotmap.models.datamodule import read_tables
    from pivotmap.tasks.cube import PivotReader
    from pivotmap.tasks.sampling import CHANNELS, sample

    ws, _ = small_run
    result = sample(ws, force=True)
    assert result.rows["train"] == 600 and result.rows["test"] == 300
    assert 0 < result.rows["unlabelled"] <= 200
    rows = pq.read_table([f for f in result.files][0]).to_pandas()
    assert set(rows.columns) >= {"series", "doy", "class", "weight", "split", "tile", "group",
                                 "region", "period", "x", "y"}  # fmt: skip
    table = read_tables([result])
    # whole groups on one side: a group is never both train and test
    frame = pq.read_table(result.table).to_pandas()
    sides = frame[frame["split"] != "unlabelled"].groupby("group")["split"].nunique()
    assert (sides == 1).all()
    # the stored series are the cube's codes at those pixels
    reader = PivotReader(ws.pivot_url)
    extent = ws.extent()
    pick = frame.sample(20, random_state=0)
    cols = np.floor((pick["x"].to_numpy() - extent.transform.c) / 10).astype(int)
    rows_ = np.floor((extent.transform.f - pick["y"].to_numpy()) / 10).astype(int)
    ds = reader.points(rows_, cols, step_days=ws.config.train.step_days, dtype="int16")
    stored = np.stack(pick["series"].to_numpy()).reshape(20, -1, len(CHANNELS))
    for c, name in enumerate(CHANNELS):
        if name in ds:
            assert np.array_equal(stored[:, :, c], ds[name].transpose("pixel", "time").values)
    assert table.series.dtype == np.int16 and table.series.shape[2] == len(CHANNELS)
    # a re-run with the same inputs skips every tile; the split is the same
    again = sample(ws)
    assert sorted(again.tiles_already_done) == sorted(t.id for t in ws.tiles())
    assert again.key == result.key and again.rows == result.rows


@pytest.mark.slow
def test_vector_polygons_are_split_whole_and_feed_training(small_run, tmp_path):
    """The demo's label raster as polygons in a GeoPackage (another CRS): every polygon's
    sampled pixels sit on one side of the split, and the train stage trains on that table."""
    import geopandas as gpd
    import pyarrow.parquet as pq
    import rasterio
    from rasterio.features import shapes
    from shapely.geometry import shape

    from pivotmap.config import deep_merge, load_run_config
    from pivotmap.tasks.sampling import sample
    from pivotmap.tasks.workspace import Workspace

    ws, path = small_run
    raster = ws.config.labels.url
    with rasterio.open(raster) as src:
        data, crs = src.read(1), src.crs
        polys = [
            {"geometry": shape(g), "code": int(v)}
            for g, v in shapes(data, mask=data > 0, transform=src.transform)
        ]
    frame = gpd.GeoDataFrame(polys, crs=crs).to_crs("EPSG:4326")
    gpkg = tmp_path / "reference.gpkg"
    frame.to_file(gpkg, layer="parcels")
    raw = yaml.safe_load(path.read_text())
    raw = deep_merge(raw, {"labels": {"url": None, "sources": [
        {"url": str(gpkg), "layer": "parcels", "class_column": "code", "buffer_m": 10}]}})  # fmt: skip
    vector_config = path.parent / "vector.yaml"  # relative paths stay relative to the region
    vector_config.write_text(yaml.safe_dump(raw))
    config = load_run_config(vector_config)
    vws = Workspace(root=ws.root, config=config)
    result = sample(vws)
    table = pq.read_table(result.table).to_pandas()
    labelled = table[table["split"] != "unlabelled"]
    assert (labelled["group"] >= 0).all()  # polygons, not blocks
    assert (labelled.groupby("group")["split"].nunique() == 1).all()
    assert result.n_groups >= 10
    from pivotmap.models.datamodule import prepare_data, read_tables

    data = prepare_data(config, read_tables([result]))
    assert data.x.shape[1:] == (data.spec.n_steps, len(data.spec.channels))
    assert set(np.unique(data.codes)) == set(result.classes)


def test_tables_of_cubes_filled_otherwise_are_not_gathered():
    from pivotmap.models.datamodule import TrainingDataError, check_same_cubes
    from pivotmap.results import SampleResult

    def sample(**pivot) -> SampleResult:
        settings = {"method": "linear", "max_hold_days": 30, "age_cap_days": 366, **pivot}
        return SampleResult(
            table="t", files=[], key="k", cube_version="c", n_groups=2, n_test_groups=1,
            rows={}, classes=[1, 2], tiles_written=[], tiles_already_done=[], duration_s=0.0,
            pivot_settings=settings,
        )  # fmt: skip

    check_same_cubes([sample(), sample()], ["here", "there"])  # alike: gathered
    with pytest.raises(TrainingDataError, match="max_hold_days=60 there, 30 here") as err:
        check_same_cubes([sample(), sample(max_hold_days=60)], ["here", "s3://b/there"])
    assert "s3://b/there" in str(err.value)
    old = sample().model_copy(update={"pivot_settings": {}})  # written before they were kept
    check_same_cubes([sample(), old], ["here", "old"])
