"""Incremental pivot updates: tail-only recompute, same values as a full build, idempotent,
new days invisible until the metadata switch; and the update planner."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pivotmap.tasks.pivot import CubeState, Tail, plan_update
from tests.pivot_data import START, build, write_obs

S2_DAYS = np.arange(0, 90, 5)
S1_DAYS = np.arange(2, 90, 6)


def _obs(root: Path, last_day: int) -> dict[str, str]:
    urls = {
        "s2": str(root / f"obs_s2_{last_day}.zarr"),
        "s1": str(root / f"obs_s1_{last_day}.zarr"),
    }
    write_obs(urls["s2"], "s2", S2_DAYS[S2_DAYS <= last_day])
    write_obs(urls["s1"], "s1", S1_DAYS[S1_DAYS <= last_day])
    return urls


def _first_new(old_last: int) -> Tail:
    first = {"s2": S2_DAYS[S2_DAYS > old_last][0], "s1": S1_DAYS[S1_DAYS > old_last][0]}
    return Tail(old_last + 1, {m: int(d) for m, d in first.items()})


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def updated(tmp_path_factory):
    """A 60-day cube updated to 90 days, and a 90-day cube built in one go."""
    root = tmp_path_factory.mktemp("update")
    old, new = _obs(root, 59), _obs(root, 89)
    build(str(root / "full.zarr"), new, 90)
    build(str(root / "inc.zarr"), old, 60)
    info = build(str(root / "inc.zarr"), new, 90, _first_new(59), create=False)
    return root, info


def test_update_equals_full_build_and_recomputes_only_the_tail(updated):
    root, info = updated
    full = xr.open_zarr(root / "full.zarr").load()
    inc = xr.open_zarr(root / "inc.zarr").load()
    assert inc.sizes["time"] == 90
    assert inc.time.values[-1] == np.datetime64(START + dt.timedelta(days=89), "ns")
    for name in full.data_vars:
        np.testing.assert_array_equal(inc[name].values, full[name].values, err_msg=name)
    assert 0 < info[0]["first_day"] < 60  # the days before the last old observations were kept


def test_rerunning_the_same_update_changes_no_byte(updated):
    root, _ = updated
    before = _digest(root / "inc.zarr")
    build(str(root / "inc.zarr"), _obs(root, 89), 90, _first_new(59), create=False)
    assert _digest(root / "inc.zarr") == before


def test_a_longer_period_without_new_observations_appends_held_days(tmp_path):
    obs = _obs(tmp_path, 89)
    build(str(tmp_path / "full.zarr"), obs, 100)
    build(str(tmp_path / "inc.zarr"), obs, 90)
    info = build(
        str(tmp_path / "inc.zarr"), obs, 100, Tail(90, {"s2": None, "s1": None}), create=False
    )
    assert info[0]["first_day"] == 90
    full, inc = xr.open_zarr(tmp_path / "full.zarr"), xr.open_zarr(tmp_path / "inc.zarr")
    xr.testing.assert_equal(inc.load(), full.load())


def test_new_days_stay_invisible_until_the_switch(tmp_path):
    old, new = _obs(tmp_path, 59), _obs(tmp_path, 89)
    url = str(tmp_path / "cube.zarr")
    build(url, old, 60)
    before = xr.open_zarr(url).load()
    build(url, new, 90, _first_new(59), create=False, publish=False)  # crash before the switch
    during = xr.open_zarr(url)
    assert during.sizes["time"] == 60 and during.attrs["period_end"] == str(
        START + dt.timedelta(59)
    )
    assert np.isfinite(during["B08"].values).mean() > 0.9  # every visible day is complete
    np.testing.assert_array_equal(during["age_s1"].values[:40], before["age_s1"].values[:40])
    build(url, new, 90, _first_new(59), create=False)  # the re-run finishes the update
    assert xr.open_zarr(url).sizes["time"] == 90


def _state(end: int, s2: list[int], items: str = "a", base: str = "k") -> CubeState:
    dates = tuple(str(START + dt.timedelta(days=d)) for d in s2)
    return CubeState("v", base, START + dt.timedelta(days=end), {"s2": dates}, {"s2": items})


def test_plan_update_decides_per_case():
    old = _state(59, [0, 5, 55])
    assert plan_update(None, old, START).mode == "create"
    assert plan_update(old, _state(59, [0, 5, 55]), START).mode == "current"
    grown = plan_update(old, _state(89, [0, 5, 55, 62], items="b"), START)
    assert grown.mode == "update" and grown.tail == Tail(60, {"s2": 62})
    longer = plan_update(old, _state(89, [0, 5, 55]), START)
    assert longer.mode == "update" and longer.tail == Tail(60, {"s2": None})
    assert plan_update(old, _state(89, [0, 55, 62], items="b"), START).mode == "create"
    assert plan_update(old, _state(59, [0, 5, 55], items="b"), START).mode == "create"
    assert plan_update(old, _state(89, [0, 5, 55], base="other"), START).mode == "create"
    assert plan_update(old, _state(30, [0, 5]), START).mode == "create"


def test_cube_state_round_trips_through_attributes():
    state = _state(59, [0, 5, 55])
    assert CubeState.from_attrs(state.attrs()) == state
    assert CubeState.from_attrs({"title": "an older cube"}) is None
