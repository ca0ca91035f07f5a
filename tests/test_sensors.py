"""Real STAC API responses (Earth Search v1, Planetary Computer) parse unchanged; item checks.

The fixtures are the exact response bodies in ../shared/realdata/stac-fixtures (see its
PROVENANCE.md); tests skip when that folder is absent.
"""

import datetime as dt
import json
from pathlib import Path

import pystac
import pytest

from pivotmap.tasks.item_checks import ItemRules, check_items, item_table
from pivotmap.tasks.load import item_reads
from pivotmap.tasks.sensors import (
    S2_VARIABLES,
    AssetError,
    orbit_state,
    s1_asset_map,
    s2_asset_map,
    s2_scale_offset,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "stac-fixtures"
ES_PAGE1 = "pystac-client/earthsearch_v1_search_page1_s1grd_s2l2a_s2c1l2a_s2l1c.json"
ES_PAGE2 = "pystac-client/earthsearch_v1_search_page2_s2l2a_s2c1l2a_s2l1c.json"
PC_S2 = "pystac-client/pc_sentinel-2-l2a_search_2019-01-01_33items.json"


def _items(name: str, collection: str | None = None) -> list[pystac.Item]:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"STAC fixtures not found at {FIXTURES}")
    doc = json.loads(path.read_text())
    features = doc["features"] if isinstance(doc, dict) else doc
    items = [pystac.Item.from_dict(f) for f in features]
    return [it for it in items if collection is None or it.collection_id == collection]


@pytest.mark.parametrize("collection", ["sentinel-2-l2a", "sentinel-2-c1-l2a"])
def test_earth_search_s2_assets_and_offset(collection):
    items = _items(ES_PAGE1, collection) + _items(ES_PAGE2, collection)
    assert len(items) >= 5
    for item in items:
        amap = s2_asset_map(item)
        assert amap.mask == "scl" and amap.variables["B04"] == "red"
        assert amap.variables["B8A"] == "nir08" and amap.variables["B11"] == "swir16"
        # baseline 05.11: raster:bands declare scale 1e-4 and the -0.1 offset
        assert s2_scale_offset(item, "red") == (0.0001, -0.1)
        plan = item_reads([item], "s2")[item.id]
        assert [a.variable for a in plan.assets] == ["SCL", *S2_VARIABLES]
        assert plan.assets[3].href.startswith("https://") and plan.assets[3].offset == -0.1


def test_planetary_computer_s2_band_ids_and_baseline_offset():
    old = _items(PC_S2)  # processing baseline 02.12, no raster:bands
    new = _items("stac-geoparquet/sentinel-2-l2a-pc.json")  # baseline 05.10
    assert len(old) == 33 and len(new) == 4
    for item in old + new:
        amap = s2_asset_map(item)
        assert amap.mask == "SCL" and amap.variables == {b: b for b in S2_VARIABLES}
    assert {s2_scale_offset(it, "B04") for it in old} == {(0.0001, 0.0)}
    assert {s2_scale_offset(it, "B04") for it in new} == {(0.0001, -0.1)}
    # the same surface: DN 1500 under baseline 05.10 is DN 500 under 02.12
    (s_new, o_new), (s_old, o_old) = s2_scale_offset(new[0], "B04"), s2_scale_offset(old[0], "B04")
    assert abs((1500 * s_new + o_new) - (500 * s_old + o_old)) < 1e-9


def test_baseline_policy_overrides_declared_offsets():
    item = _items(ES_PAGE1, "sentinel-2-l2a")[0]
    item.assets["red"].extra_fields["raster:bands"][0]["offset"] = 0.0  # a wrongly declared item
    assert s2_scale_offset(item, "red") == (0.0001, 0.0)
    assert s2_scale_offset(item, "red", "baseline") == (0.0001, -0.1)


def test_s1_rtc_and_grd_layouts():
    rtc = _items("stac-geoparquet/sentinel-1-rtc-pc.json")
    assert {s1_asset_map(it).variables["VV"] for it in rtc} == {"vv"}
    assert {orbit_state(it) for it in rtc} == {"descending"}
    grd = _items(ES_PAGE1, "sentinel-1-grd")
    assert len(grd) == 3 and {orbit_state(it) for it in grd} == {"ascending"}
    with pytest.raises(AssetError, match=r"lacks S1 assets vv/vh .*\['HH'\]"):
        s1_asset_map(grd[0])  # an HH-only (polar) acquisition


def test_l1c_and_landsat_items_are_refused_with_the_item_named():
    l1c = _items(ES_PAGE1, "sentinel-2-l1c")[0]
    with pytest.raises(AssetError, match=f"{l1c.id} has no SCL"):
        s2_asset_map(l1c)
    landsat = _items(
        "pystac-client/earthsearch_v1_search_s2l2a_landsat_point.json", "landsat-c2-l2"
    )
    with pytest.raises(AssetError, match="lacks S2 band assets"):
        s2_asset_map(landsat[0])


def test_item_suite_lists_each_failing_item_with_its_reason():
    s2 = _items(ES_PAGE1, "sentinel-2-l2a") + _items(ES_PAGE1, "sentinel-2-l1c")
    s2[0].properties["eo:cloud_cover"] = 95.0
    for key in ("proj:epsg", "proj:code"):  # pystac migrates proj:epsg to proj:code
        s2[1].properties.pop(key, None)
    rules = ItemRules("s2", dt.date(2025, 7, 1), dt.date(2025, 7, 31), max_cloud_cover=80)
    checked = check_items(s2, rules)
    table = item_table(s2, "s2")
    assert list(table["item"]) == [it.id for it in s2]
    assert [it.id for it in checked.passed] == []
    reasons = {row["item"]: row["reason"] for row in checked.skipped()}
    assert "eo:cloud_cover <= 80 (got 95.0)" in reasons[s2[0].id]
    assert "known CRS" in reasons[s2[1].id]
    for l1c in s2[2:]:
        assert "SCL asset present" in reasons[l1c.id]
    assert all("date inside the period" not in r for r in reasons.values())
    late = check_items(s2[:1], ItemRules("s2", dt.date(2025, 8, 1), dt.date(2025, 8, 31)))
    assert "date inside the period 2025-08-01..2025-08-31" in late.skipped()[0]["reason"]


def test_item_suite_s1_calibration_and_orbit():
    rtc = _items("stac-geoparquet/sentinel-1-rtc-pc.json")
    grd = _items(ES_PAGE1, "sentinel-1-grd")
    period = (dt.date(2024, 1, 1), dt.date(2025, 12, 31))
    checked = check_items(rtc + grd, ItemRules("s1", *period))
    assert [it.id for it in checked.passed] == [it.id for it in rtc]
    for row in checked.skipped():
        assert "required assets present (got 'vv, vh')" in row["reason"]
    asc = check_items(rtc, ItemRules("s1", *period, orbit_state="ascending"))
    assert not asc.passed and "orbit ascending" in asc.skipped()[0]["reason"]
    dn = rtc[0].clone()
    for key in ("vv", "vh"):
        dn.assets[key].extra_fields["raster:bands"][0]["data_type"] = "uint16"
    reason = check_items([dn], ItemRules("s1", *period)).skipped()[0]["reason"]
    assert "calibrated backscatter (float), not GRD digital numbers (got 'uint16')" in reason
