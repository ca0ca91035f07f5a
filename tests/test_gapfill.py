"""Gap filling against a per-pixel np.interp reference, hold limits and information age."""

import numpy as np
import pytest

from pivotmap.tasks.gapfill import linear_fill


def _reference(values, days, n_days, max_hold):
    """Straightforward per-pixel loop: what linear_fill must reproduce."""
    out = np.full(n_days, np.nan)
    age = np.full(n_days, np.nan)
    ok = np.isfinite(values)
    if not ok.any():
        return out, age
    d_ok, v_ok = days[ok], values[ok]
    for d in range(n_days):
        if d_ok[0] <= d <= d_ok[-1]:
            out[d] = np.interp(d, d_ok, v_ok)
        elif d < d_ok[0] and d_ok[0] - d <= max_hold:
            out[d] = v_ok[0]
        elif d > d_ok[-1] and d - d_ok[-1] <= max_hold:
            out[d] = v_ok[-1]
        if np.isfinite(out[d]):
            age[d] = np.abs(d_ok - d).min()
    return out, age


def test_matches_reference_on_random_gaps():
    rng = np.random.default_rng(1)
    n_days, n_obs, n_px = 120, 25, 200
    days = np.sort(rng.choice(np.arange(-10, 130), n_obs, replace=False))
    values = rng.normal(size=(n_obs, n_px)).astype(np.float32)
    values[rng.random((n_obs, n_px)) < 0.4] = np.nan
    values[:, 0] = np.nan  # a pixel never observed
    result = linear_fill({"b": values}, days, n_days, max_hold_days=7)
    for p in range(n_px):
        expected, age = _reference(values[:, p].astype(np.float64), days, n_days, 7)
        np.testing.assert_allclose(
            result.values["b"][:, p], expected, rtol=1e-5, atol=1e-5, equal_nan=True
        )
        np.testing.assert_array_equal(result.age[:, p], age)


def _nearest_reference(values, days, n_days, max_hold):
    """Per pixel: the value of the nearest valid observation (earlier on a tie), within holds."""
    out, age = _reference(values, days, n_days, max_hold)  # where filled, and the age
    ok = np.isfinite(values)
    d_ok, v_ok = days[ok], values[ok]
    for d in np.flatnonzero(np.isfinite(out)):
        out[d] = v_ok[np.argmin(np.abs(d_ok - d))]  # argmin: the first, i.e. earlier, on a tie
    return out, age


@pytest.mark.parametrize("scales", [None, {"b": 1e-2, "age": 1.0}])
def test_nearest_takes_the_nearest_valid_observation(scales):
    from pivotmap.tasks.gapfill import fill_chunked, get_method

    rng = np.random.default_rng(5)
    n_days, n_obs, n_px = 90, 20, 150
    days = np.sort(rng.choice(np.arange(-5, 95), n_obs, replace=False))
    values = rng.normal(size=(n_obs, n_px)).astype(np.float32)
    values[rng.random((n_obs, n_px)) < 0.4] = np.nan
    values[:, 0] = np.nan
    result = fill_chunked(get_method("nearest"), {"b": values}, days, n_days, 6, 366, scales, 2)
    for p in range(n_px):
        expected, age = _nearest_reference(values[:, p].astype(np.float64), days, n_days, 6)
        got = result.values["b"][:, p]
        if scales:  # the code of the observation's value, fill where nothing was filled
            expected = np.where(np.isfinite(expected), np.round(expected / 1e-2), -32768)
            age = np.where(np.isfinite(age), age, -32768)
        np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(result.age[:, p], age)
    assert get_method("nearest").version == "1"


def test_observed_days_keep_their_values_and_age_zero():
    days = np.array([0, 10, 20])
    values = np.array([[1.0], [3.0], [2.0]], dtype=np.float32)
    result = linear_fill({"b": values}, days, 21, max_hold_days=0)
    assert result.values["b"][[0, 10, 20], 0].tolist() == [1.0, 3.0, 2.0]
    assert result.values["b"][5, 0] == pytest.approx(2.0)
    assert result.age[[0, 5, 10, 14], 0].tolist() == [0, 5, 0, 4]


def test_all_bands_of_a_modality_share_validity():
    days = np.array([0, 4])
    a = np.array([[1.0], [5.0]], dtype=np.float32)
    b = np.array([[np.nan], [5.0]], dtype=np.float32)  # first date invalid in one band only
    result = linear_fill({"a": a, "b": b}, days, 5, max_hold_days=10)
    assert np.all(result.values["a"][:, 0] == 5.0)  # the invalid date is dropped for both
    assert result.age[:, 0].tolist() == [4, 3, 2, 1, 0]


def test_hold_limit_and_cap():
    days = np.array([50])
    values = np.array([[2.0]], dtype=np.float32)
    result = linear_fill({"b": values}, days, 100, max_hold_days=10, age_cap_days=5)
    filled = np.isfinite(result.values["b"][:, 0])
    assert filled.sum() == 21 and filled[40] and not filled[39] and filled[60] and not filled[61]
    assert np.nanmax(result.age) == 5


def test_encoded_output_steps_by_whole_codes_and_stays_close():
    rng = np.random.default_rng(3)
    days = np.array([0, 7, 20, 33])
    values = rng.uniform(0.05, 0.4, size=(4, 50)).astype(np.float32)
    exact = linear_fill({"b": values}, days, 34, max_hold_days=0).values["b"]
    coded = linear_fill({"b": values}, days, 34, 0, scales={"b": 1e-4, "age": 1.0})
    codes = coded.values["b"].astype(np.int64)
    assert coded.values["b"].dtype == np.int16 and coded.age.dtype == np.int16
    assert np.all(np.diff(codes[1:7], 2, axis=0) == 0)  # a constant whole step inside a gap
    k = np.concatenate([np.arange(7), np.arange(13), np.arange(14)])[:, None]
    assert np.all(np.abs(codes - exact / 1e-4) <= k / 2 + 0.5 + 1e-3)
    np.testing.assert_array_equal(codes[days], np.round(values / 1e-4))


def test_methods_are_pluggable_and_chunked_filling_matches():
    from pivotmap.tasks.gapfill import METHODS, fill_chunked, get_method, register_method

    assert get_method("linear").name == "linear"
    with pytest.raises(
        ValueError, match="unknown gap-filling method 'spline'; known: linear, nearest"
    ):
        get_method("spline")

    class Nearest:
        name, version = "nearest-test", "1"

        def fill(self, obs, obs_day, n_days, max_hold_days, age_cap_days, scales=None, out=None):
            return linear_fill(obs, obs_day, n_days, max_hold_days, age_cap_days, scales, out)

        def first_changed_day(self, valid, obs_day, first_new_day, max_hold_days):
            return 0

    try:
        register_method(Nearest())
        assert get_method("nearest-test").version == "1"
    finally:
        METHODS.pop("nearest-test", None)
    with pytest.raises(TypeError, match="does not implement GapFillMethod"):
        register_method(object())
    values = np.random.default_rng(0).normal(size=(6, 4, 300)).astype(np.float32)
    values[:, :, ::7] = np.nan
    days = np.array([0, 3, 9, 10, 15, 30])
    whole = linear_fill({"b": values}, days, 31, 5)
    parts = fill_chunked(get_method("linear"), {"b": values}, days, 31, 5, 366, chunks=3)
    np.testing.assert_array_equal(parts.values["b"], whole.values["b"])
    np.testing.assert_array_equal(parts.age, whole.age)


def test_first_changed_day_is_the_day_after_the_last_valid_observation():
    from pivotmap.tasks.gapfill import get_method

    method = get_method("linear")
    days = np.array([0, 10, 20])
    valid = np.array([[True, True], [True, False], [False, False]])
    assert method.first_changed_day(valid, days, 25, max_hold_days=5) == 1
    assert method.first_changed_day(valid[:, :1], days, 25, max_hold_days=5) == 11
    assert method.first_changed_day(valid[2:], days[2:], 25, max_hold_days=5) == 20
