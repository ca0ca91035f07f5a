"""Great Expectations suite over the table of found STAC items: which items the cube may use.

One row per item (required assets, CRS, date, cloud cover, orbit, calibration); every expectation
is a per-row check, so GX's unexpected-row lists say exactly which item failed which rule. Failing
items are returned with their reasons, never dropped silently. GX runs in an ephemeral context
(nothing written, no network) and is imported only when a suite runs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pystac

from pivotmap.runtime import apply_offline_defaults
from pivotmap.tasks.sensors import (
    AssetError,
    item_epsg,
    orbit_state,
    raster_band,
    s1_asset_map,
    s2_layout,
)

if TYPE_CHECKING:
    import pandas as pd

SUITE = "stac_items"
EPOCH = dt.date(1970, 1, 1)
NO_SCL = "SCL asset present"


@dataclass(frozen=True)
class ItemRules:
    """What an item must satisfy to enter the cube."""

    modality: str
    start: dt.date
    end: dt.date
    max_cloud_cover: float = 100.0
    orbit_state: str | None = None


@dataclass(frozen=True)
class ItemCheck:
    """Items that passed, and the failures per item id (in suite order)."""

    passed: list[pystac.Item]
    failures: dict[str, list[str]] = field(default_factory=dict)
    statistics: dict = field(default_factory=dict)

    def skipped(self) -> list[dict]:
        """`{"item", "reason"}` rows for the run summary."""
        return [{"item": k, "reason": "; ".join(v)} for k, v in self.failures.items()]


def item_table(items: list[pystac.Item], modality: str) -> pd.DataFrame:
    """One row per item with the fields the suite checks."""
    import pandas as pd

    rows = [_s2_row(it) if modality == "s2" else _s1_row(it) for it in items]
    return pd.DataFrame(rows, columns=_columns(modality))


def _columns(modality: str) -> list[str]:
    extra = ["scl", "cloud_cover"] if modality == "s2" else ["orbit_state", "data_type"]
    return ["item", "missing_assets", "epsg", "day", *extra]


def _common(item: pystac.Item, key: str | None) -> dict[str, Any]:
    when = item.datetime or item.common_metadata.start_datetime
    epsg = item_epsg(item, key) if key in item.assets else item_epsg(item)
    return {
        "item": item.id,
        "epsg": float(epsg) if epsg is not None and _known_epsg(epsg) else None,
        "day": (when.astimezone(dt.UTC).date() - EPOCH).days if when else None,
    }


def _s2_row(item: pystac.Item) -> dict[str, Any]:
    amap = s2_layout(item)
    missing = [k for k in amap.variables.values() if k not in item.assets]
    cloud = item.properties.get("eo:cloud_cover")
    return {
        **_common(item, amap.variables["B04"]),
        "missing_assets": ", ".join(missing),
        "scl": amap.mask,
        "cloud_cover": float(cloud) if cloud is not None else None,
    }


def _s1_row(item: pystac.Item) -> dict[str, Any]:
    try:
        key = s1_asset_map(item).variables["VV"]
        missing = ""
    except AssetError:
        key, missing = (
            None,
            ", ".join(k for k in ("vv", "vh") if k not in map(str.lower, item.assets)),
        )
    return {
        **_common(item, key),
        "missing_assets": missing,
        "orbit_state": orbit_state(item) or "unknown",
        "data_type": str(raster_band(item, key).get("data_type", "float32")) if key else None,
    }


def _known_epsg(code: int) -> bool:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_epsg(code)
    except CRSError:
        return False
    return True


def expectations(rules: ItemRules) -> list[Any]:
    """The suite: required assets, known CRS, dates in the period, cloud cover / orbit / calibration."""
    import great_expectations.expectations as gxe

    first, last = (rules.start - EPOCH).days, (rules.end - EPOCH).days
    out: list[Any] = [
        gxe.ExpectColumnValuesToBeInSet(
            column="missing_assets", value_set=[""], description="required assets present"
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="epsg", description="known CRS (proj:epsg/code)"),
        gxe.ExpectColumnValuesToNotBeNull(column="day", description="item has a datetime"),
        gxe.ExpectColumnValuesToBeBetween(
            column="day",
            min_value=first,
            max_value=last,
            description=f"date inside the period {rules.start}..{rules.end}",
        ),
    ]
    if rules.modality == "s2":
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column="scl", description=NO_SCL),
            gxe.ExpectColumnValuesToBeBetween(
                column="cloud_cover",
                min_value=0,
                max_value=rules.max_cloud_cover,
                description=f"eo:cloud_cover <= {rules.max_cloud_cover:g}",
            ),
        ]
    else:
        out.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="data_type",
                value_set=["float32", "float64"],
                description="calibrated backscatter (float), not GRD digital numbers",
            )
        )
        if rules.orbit_state:
            out.append(
                gxe.ExpectColumnValuesToBeInSet(
                    column="orbit_state",
                    value_set=[rules.orbit_state],
                    description=f"orbit {rules.orbit_state} (ingest.s1_orbit_state)",
                )
            )
    return out


def check_items(items: list[pystac.Item], rules: ItemRules) -> ItemCheck:
    """Run the item suite; items failing any expectation are returned with the reasons."""
    if not items:
        return ItemCheck(passed=[], statistics={"items": 0})
    table = item_table(items, rules.modality)
    failures = _run(table, expectations(rules))
    passed = [it for it in items if it.id not in failures]
    stats = {"items": len(items), "passed": len(passed), "failed": len(failures)}
    return ItemCheck(passed=passed, failures=failures, statistics=stats)


def _run(table: pd.DataFrame, suite: list[Any]) -> dict[str, list[str]]:
    apply_offline_defaults()  # GX analytics off, also when called outside the CLI
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(name="pivotmap").add_dataframe_asset(name=SUITE)
    batch = asset.add_batch_definition_whole_dataframe("all")
    gx_suite = context.suites.add(gx.ExpectationSuite(name=SUITE, expectations=suite))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE, data=batch, suite=gx_suite)
    )
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": ["item"]}
    report = definition.run(batch_parameters={"dataframe": table}, result_format=fmt)
    failures: dict[str, list[str]] = {}
    for result in report.results:
        config = result.expectation_config
        assert config is not None  # results of a suite's run carry their expectation
        if (result.exception_info or {}).get("raised_exception"):
            raise RuntimeError(f"item check {config.description!r} could not run: {result}")
        for row in (result.result or {}).get("unexpected_index_list") or []:
            value = row.get(config.kwargs["column"])
            failures.setdefault(row["item"], []).append(
                f"{config.description} (got {_show(value)})"
            )
    return failures


def _show(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return "none" if value is None or value != value else repr(value)
