"""Quality gates: a good cube/map passes, each kind of defect fails and is named."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature
from pivotmap.tasks.quality import (
    QualityGateError,
    QualityResult,
    validate_cube,
    validate_map,
)

NY = NX = 16
DAYS = 30
# Typical vegetation spectrum: low visible, high NIR, moderate SWIR.
SPECTRUM = {
    "B02": 0.04, "B03": 0.07, "B04": 0.05, "B05": 0.11, "B06": 0.25,
    "B07": 0.30, "B08": 0.33, "B8A": 0.34, "B11": 0.20, "B12": 0.10,
}  # fmt: skip
BACKSCATTER_DB = {"VV": -11.0, "VH": -17.5}


@pytest.fixture(scope="module", autouse=True)
def _no_network():
    """GX must validate without phoning home: any outbound connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


def make_cube(nan_fraction: float = 0.1, start: str = "2024-05-01", freq: str = "D") -> xr.Dataset:
    """A 16x16 px x 30 day pivot cube with plausible values and scattered NaN."""
    rng = np.random.default_rng(42)
    shape = (DAYS, NY, NX)
    season = 1.0 + 0.2 * np.sin(np.linspace(0, np.pi, DAYS))[:, None, None]
    data = {}
    for band, level in SPECTRUM.items():
        data[band] = level * season * rng.normal(1.0, 0.1, shape)
    for pol, level in BACKSCATTER_DB.items():
        data[pol] = level + rng.normal(0.0, 1.5, shape)
    data["age_s2"] = rng.integers(0, 12, shape).astype(float)
    data["age_s1"] = rng.integers(0, 6, shape).astype(float)
    for name, values in data.items():
        values[rng.random(shape) < nan_fraction] = np.nan
        data[name] = (("time", "y", "x"), values.astype(np.float32))
    coords = {
        "time": pd.date_range(start, periods=DAYS, freq=freq),
        "y": 5_000_000.0 - 10.0 * np.arange(NY),
        "x": 3_000_000.0 + 10.0 * np.arange(NX),
    }
    return xr.Dataset(data, coords=coords)


@pytest.fixture(scope="module")
def good_cube() -> xr.Dataset:
    return make_cube()


@pytest.fixture(scope="module")
def good_cube_result(good_cube) -> QualityResult:
    return validate_cube(good_cube)


# --------------------------------------------------------------------------- cube


def test_good_cube_passes(good_cube_result):
    result = good_cube_result
    assert result.success, result.failed_critical
    assert result.failed_critical == ()
    assert result.failed_warning == ()
    # 14 variables x (range + non-null) + 3 median warnings + time axis + layout
    assert result.evaluated == 14 * 2 + 3 + 2
    assert result.statistics["pixels"] == NY * NX
    assert result.statistics["rows"] == NY * NX * DAYS
    assert result.statistics["start"] == "2024-05-01"
    assert 0.85 < result.statistics["valid_fraction"]["B04"] < 0.95
    result.raise_for_failure()


def test_result_is_json_serialisable(good_cube_result):
    as_dict = json.loads(json.dumps(good_cube_result.to_dict()))
    assert as_dict["suite"] == good_cube_result.suite
    assert as_dict["success"] is True
    assert as_dict["evaluated"] == good_cube_result.evaluated


def test_out_of_range_reflectance_fails_naming_band(good_cube):
    cube = good_cube.copy(deep=True)
    b04 = cube["B04"].values
    b04[:, : NY // 10 + 1, :] = 5.0  # 2 of 16 rows: ~12% of B04 values
    result = validate_cube(cube)
    assert not result.success
    assert len(result.failed_critical) == 1
    message = result.failed_critical[0]
    assert message.startswith("B04 values in [-0.2, 1.6]: ")
    assert message.endswith("% outside")
    assert 11.0 < float(message.split(": ")[1].split("%")[0]) < 14.0
    with pytest.raises(QualityGateError, match=r"'pivot_cube'.*B04 values"):
        result.raise_for_failure()


def test_a_few_outliers_are_tolerated(good_cube):
    cube = good_cube.copy(deep=True)
    cube["B04"].values[0, 0, 0] = 5.0  # 1 value in 7680 < 0.1%
    assert validate_cube(cube).success


def test_negative_age_fails(good_cube):
    cube = good_cube.copy(deep=True)
    cube["age_s1"].values[3, 2:4, :] = -1.0
    result = validate_cube(cube)
    assert not result.success
    assert [m.split(":")[0] for m in result.failed_critical] == ["age_s1 values ≥ 0"]


@pytest.mark.parametrize("freq", ["2D", "-1D"])
def test_non_daily_time_axis_fails(freq):
    start = "2024-05-30" if freq.startswith("-") else "2024-05-01"
    result = validate_cube(make_cube(start=start, freq=freq))
    assert not result.success
    (message,) = result.failed_critical
    assert message.startswith("time axis strictly increasing by one day: 29 of 29 steps")


def test_duplicated_day_fails(good_cube):
    times = good_cube["time"].values.copy()
    times[10] = times[9]
    result = validate_cube(good_cube.assign_coords(time=times))
    (message,) = result.failed_critical
    assert "2 of 29 steps are not one day (first: 2024-05-10 → 2024-05-10)" in message


def test_too_many_nan_fails_and_threshold_is_a_parameter(good_cube):
    cube = good_cube.copy(deep=True)
    b11 = cube["B11"].values
    b11[:, : NY * 7 // 10, :] = np.nan  # 11 of 16 rows, plus the scattered 10%
    strict = validate_cube(cube)
    assert not strict.success
    (message,) = strict.failed_critical
    assert message.startswith("B11 non-null fraction ≥ 0.5: ")
    assert message.endswith("% null")
    assert strict.statistics["valid_fraction"]["B11"] < 0.5
    assert validate_cube(cube, min_valid_fraction=0.2).success


def test_s2_only_cube_validates_what_exists(good_cube):
    cube = good_cube.drop_vars(["VV", "VH", "age_s1"])
    result = validate_cube(cube)
    assert result.success, result.failed_critical
    assert "VV" not in result.statistics["variables"]
    assert result.evaluated == 11 * 2 + 1 + 2


def test_cube_without_pivot_variables_fails(good_cube):
    result = validate_cube(good_cube[[]].assign(other=good_cube["B04"]))
    assert not result.success
    assert "none of the pivot variables" in result.failed_critical[0]


def test_implausible_median_is_only_a_warning(good_cube):
    cube = good_cube.copy(deep=True)
    cube["B08"].values[:] = 0.95
    result = validate_cube(cube)
    assert result.success
    assert result.failed_warning == ("median B08 in [0.01, 0.8]: observed 0.95",)


def test_dask_cube_matches_in_memory_and_sampling_is_seeded(good_cube):
    lazy = good_cube.chunk({"time": -1, "y": 8, "x": 8})
    a = validate_cube(lazy, sample_pixels=100, seed=7)
    b = validate_cube(good_cube, sample_pixels=100, seed=7)
    assert a == b
    assert a.statistics["pixels"] == 100 and a.statistics["rows"] == 100 * DAYS
    assert validate_cube(good_cube, sample_pixels=100, seed=8).statistics != a.statistics


def test_cube_with_wrong_dims_is_rejected(good_cube):
    with pytest.raises(ValueError, match=r"\(time, y, x\)"):
        validate_cube(good_cube.rename(y="lat"))


# --------------------------------------------------------------------------- map


@pytest.fixture(scope="module")
def nomenclature() -> Nomenclature:
    classes = [
        {"code": c, "name": n, "color": "#336699", "description": f"{n} land."}
        for c, n in [(1, "crop"), (2, "forest"), (3, "water"), (10, "urban")]
    ]
    return Nomenclature(name="test", classes=classes)


def make_map(shape=(64, 64), nodata_fraction=0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    classes = rng.choice(np.array([1, 2, 3, 10], dtype=np.uint8), size=shape)
    classes[rng.random(shape) < nodata_fraction] = NODATA_CODE
    confidence = rng.integers(20, 101, size=shape).astype(np.uint8)
    confidence[classes == NODATA_CODE] = 0
    return classes, confidence


def test_good_map_passes(nomenclature):
    result = validate_map(*make_map(), nomenclature)
    assert result.success, result.failed_critical
    assert result.failed_warning == ()
    assert result.evaluated == 4
    assert 0.05 < result.statistics["nodata_fraction"] < 0.15
    assert set(result.statistics["class_fraction"]) == {"1", "2", "3", "10", "255"}
    json.dumps(result.to_dict())
    result.raise_for_failure()


def test_unknown_class_code_fails_naming_code(nomenclature):
    classes, confidence = make_map()
    classes[5, 10:20] = 77
    result = validate_map(classes, confidence, nomenclature)
    assert not result.success
    (message,) = result.failed_critical
    assert message.startswith("class codes in 'test' codes ∪ {255}: ")
    assert message.endswith("e.g. [77]")
    with pytest.raises(QualityGateError, match=r"'class_map'.*\[77\]"):
        result.raise_for_failure()


def test_confidence_above_100_fails_but_not_on_nodata(nomenclature):
    classes, confidence = make_map()
    mapped = classes != NODATA_CODE
    bad = confidence.copy()
    np.put(bad, np.flatnonzero(mapped)[:50], 130)  # 50 of ~3700 mapped pixels
    result = validate_map(classes, bad, nomenclature)
    assert not result.success
    (message,) = result.failed_critical
    assert message.startswith("confidence in [0, 100] where class != 255: ")
    # A fill value under nodata pixels is not a confidence.
    under_nodata = confidence.copy()
    under_nodata[~mapped] = 200
    assert validate_map(classes, under_nodata, nomenclature).success


def test_too_much_nodata_fails(nomenclature):
    classes, confidence = make_map(nodata_fraction=0.7)
    result = validate_map(classes, confidence, nomenclature)
    assert not result.success
    (message,) = result.failed_critical
    assert message.startswith("nodata (255) fraction ≤ 0.5: ")
    assert validate_map(classes, confidence, nomenclature, max_nodata_fraction=0.8).success


def test_absent_class_is_only_a_warning(nomenclature):
    classes, confidence = make_map()
    classes[classes == 10] = 1
    result = validate_map(classes, confidence, nomenclature)
    assert result.success
    assert result.failed_warning == ("every class of the nomenclature present: missing [10]",)


def test_large_map_is_sampled(nomenclature):
    classes, confidence = make_map(shape=(1100, 1000))
    result = validate_map(classes, confidence, nomenclature)
    assert result.success
    assert result.statistics["pixels"] == 1_100_000
    assert result.statistics["sampled"] == 1_000_000


def test_map_shape_mismatch_is_rejected(nomenclature):
    classes, confidence = make_map()
    with pytest.raises(ValueError, match="differ"):
        validate_map(classes, confidence[:-1], nomenclature)
