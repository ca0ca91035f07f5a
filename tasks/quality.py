"""Data-quality gates (Great Expectations) for the pivot cube and the class maps.

A gate samples the data into a pandas DataFrame, runs a GX suite on it in an ephemeral context
(nothing written, no network) and returns a small `QualityResult`. Expectations have a GX severity:
a failed *critical* one fails the gate (`raise_for_failure`), a failed *warning* one is only
reported. Checks that GX cannot express on a flat table (the daily time axis, the cube layout) run
in numpy and are reported the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pivotmap.runtime import apply_offline_defaults
from pivotmap.tasks.nomenclature import NODATA_CODE, Nomenclature

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

CUBE_SUITE = "pivot_cube"
MAP_SUITE = "class_map"
REFLECTANCES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
BACKSCATTER = ("VV", "VH")
AGES = ("age_s2", "age_s1")
REFLECTANCE_RANGE = (-0.2, 1.6)  # unitless; > 1 happens on specular targets, not at 5
BACKSCATTER_RANGE = (-60.0, 30.0)  # dB
MOSTLY_IN_RANGE = 0.999
# Median, not mean: GX's pandas mean scans every value in Python for Decimals (~0.5 s/column).
MEDIAN_WARNINGS = {"B08": (0.01, 0.8), "VV": (-30.0, 0.0), "VH": (-35.0, -5.0)}
MAX_MAP_SAMPLE = 1_000_000
CLASS_COL, CONFIDENCE_COL = "class", "confidence"


class QualityGateError(RuntimeError):
    """A critical data-quality expectation failed; the run must stop before publishing."""


@dataclass(frozen=True)
class QualityResult:
    """The outcome of one quality suite; `success` means no critical expectation failed."""

    suite: str
    success: bool
    failed_critical: tuple[str, ...]
    failed_warning: tuple[str, ...]
    evaluated: int
    statistics: dict

    def to_dict(self) -> dict:
        out = asdict(self)
        out["failed_critical"] = list(self.failed_critical)
        out["failed_warning"] = list(self.failed_warning)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> QualityResult:
        """The result as `to_dict` wrote it (a stage result keeps it as JSON)."""
        fields = {**raw, "failed_critical": tuple(raw["failed_critical"])}
        return cls(**{**fields, "failed_warning": tuple(raw["failed_warning"])})

    def raise_for_failure(self) -> None:
        if not self.success:
            raise QualityGateError(
                f"quality suite {self.suite!r} failed {len(self.failed_critical)} critical "
                f"expectation(s): " + "; ".join(self.failed_critical)
            )


# --------------------------------------------------------------------------- cube


def validate_cube(
    ds: xr.Dataset,
    *,
    sample_pixels: int = 4096,
    seed: int = 0,
    min_valid_fraction: float = 0.5,
) -> QualityResult:
    """Validate a pivot cube on `sample_pixels` random pixel time series (all days).

    Reflectance, backscatter and age ranges, per-variable non-null fraction and the daily time
    axis are critical; implausible band medians are warnings. Only the variables present are
    checked.
    """
    if sample_pixels < 1:
        raise ValueError(f"sample_pixels must be at least 1, got {sample_pixels}")
    for dim in ("time", "y", "x"):
        if dim not in ds.dims:
            raise ValueError(f"cube has dims {tuple(ds.dims)}; the pivot contract is (time, y, x)")
    names, layout_failure = _cube_variables(ds)
    structural = [_time_axis_failure(ds["time"].values), layout_failure]
    frame = _sample_pixels(ds, names, sample_pixels, seed)
    expectations = _cube_expectations(names, min_valid_fraction)
    stats = {
        "pixels": int(min(sample_pixels, ds.sizes["y"] * ds.sizes["x"])),
        "days": int(ds.sizes["time"]),
        "rows": int(len(frame)),
        "variables": list(names),
        "valid_fraction": {n: round(float(frame[n].notna().mean()), 4) for n in names},
    }
    if ds.sizes["time"]:
        stats["start"] = str(np.datetime_as_string(ds["time"].values[0], unit="D"))
        stats["end"] = str(np.datetime_as_string(ds["time"].values[-1], unit="D"))
    return _run_suite(CUBE_SUITE, frame, expectations, structural, stats)


def _cube_variables(ds: xr.Dataset) -> tuple[list[str], str | None]:
    """The contract variables present on (time, y, x), and a failure text for the rest."""
    known = [n for n in (*REFLECTANCES, *BACKSCATTER, *AGES) if n in ds.data_vars]
    good = [n for n in known if set(ds[n].dims) == {"time", "y", "x"}]
    bad = [f"{n}{tuple(ds[n].dims)}" for n in known if n not in good]
    if not known:
        return good, "cube variables on (time, y, x): none of the pivot variables is present"
    if bad:
        return good, f"cube variables on (time, y, x): {', '.join(bad)} have other dims"
    return good, None


def _time_axis_failure(time: np.ndarray) -> str | None:
    """None when the time axis is datetime64 and steps by exactly one day, else why not."""
    label = "time axis strictly increasing by one day"
    if not np.issubdtype(time.dtype, np.datetime64):
        return f"{label}: time has dtype {time.dtype}, not datetime64"
    if time.size == 0:
        return f"{label}: the cube has no days"
    steps = np.diff(time.astype("datetime64[ns]"))
    bad = np.flatnonzero(steps != np.timedelta64(1, "D"))
    if bad.size == 0:
        return None
    day = np.datetime_as_string(time[bad[0] : bad[0] + 2], unit="D")
    first = f"{day[0]} → {day[1]}"
    return f"{label}: {bad.size} of {steps.size} steps are not one day (first: {first})"


def _sample_pixels(ds: xr.Dataset, names: list[str], n: int, seed: int) -> pd.DataFrame:
    """All days of `n` seeded-random pixels as a long table; loads only those pixels."""
    import pandas as pd
    import xarray as xr

    ny, nx = ds.sizes["y"], ds.sizes["x"]
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(ny * nx, size=min(n, ny * nx), replace=False))
    iy, ix = np.divmod(flat, nx)
    if not names:
        return pd.DataFrame()
    points = ds[names].isel(y=xr.DataArray(iy, dims="p"), x=xr.DataArray(ix, dims="p")).load()
    # float64: GX's pandas range check is vectorised only for int64/float64 columns. One
    # (variables, rows) block becomes the frame's single block without another copy.
    block = np.empty((len(names), points.sizes["time"] * points.sizes["p"]), dtype=np.float64)
    for row, name in zip(block, names, strict=True):
        row[:] = points[name].transpose("time", "p").values.ravel()
    return pd.DataFrame(block.T, columns=names, copy=False)


def _cube_expectations(names: list[str], min_valid_fraction: float) -> list[Any]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    out: list[Any] = []
    for name in names:
        if name in REFLECTANCES or name in BACKSCATTER:
            lo, hi = REFLECTANCE_RANGE if name in REFLECTANCES else BACKSCATTER_RANGE
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=name,
                    min_value=lo,
                    max_value=hi,
                    mostly=MOSTLY_IN_RANGE,
                    description=f"{name} values in [{lo:g}, {hi:g}]",
                )
            )
        else:
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=name, min_value=0, description=f"{name} values ≥ 0"
                )
            )
        out.append(
            gxe.ExpectColumnValuesToNotBeNull(
                column=name,
                mostly=min_valid_fraction,
                description=f"{name} non-null fraction ≥ {min_valid_fraction:g}",
            )
        )
        if name in MEDIAN_WARNINGS:
            lo, hi = MEDIAN_WARNINGS[name]
            out.append(
                gxe.ExpectColumnMedianToBeBetween(
                    column=name,
                    min_value=lo,
                    max_value=hi,
                    severity=FailureSeverity.WARNING,
                    description=f"median {name} in [{lo:g}, {hi:g}]",
                )
            )
    return out


# --------------------------------------------------------------------------- map


def validate_map(
    classes: np.ndarray,
    confidence: np.ndarray,
    nomenclature: Nomenclature,
    *,
    max_nodata_fraction: float = 0.5,
    previous_fraction: dict[str, float] | None = None,
    max_share_change: float = 0.1,
) -> QualityResult:
    """Validate a class map and its confidence (sampled to at most 1e6 pixels, seed 0).

    Known codes, confidence in 0..100 on mapped pixels and the nodata fraction are critical;
    a class of the nomenclature that never occurs, and a class share that moved by more than
    `max_share_change` since the previously published map (`previous_fraction`: code → share of
    the mapped pixels), are warnings.
    """
    import pandas as pd

    classes, confidence = np.asarray(classes), np.asarray(confidence)
    if classes.shape != confidence.shape:
        raise ValueError(f"classes {classes.shape} and confidence {confidence.shape} differ")
    cls, conf = classes.ravel(), confidence.ravel()
    if cls.size > MAX_MAP_SAMPLE:
        pick = np.sort(np.random.default_rng(0).choice(cls.size, MAX_MAP_SAMPLE, replace=False))
        cls, conf = cls[pick], conf[pick]
    # int64/float64: GX's pandas range check is vectorised only for those dtypes.
    wide = np.int64 if np.issubdtype(conf.dtype, np.integer) else np.float64
    frame = pd.DataFrame({CLASS_COL: cls.astype(np.int64), CONFIDENCE_COL: conf.astype(wide)})
    codes, counts = np.unique(cls, return_counts=True)
    stats: dict[str, Any] = {
        "pixels": int(classes.size),
        "sampled": int(cls.size),
        "nodata_fraction": round(float(np.mean(cls == NODATA_CODE)) if cls.size else 0.0, 4),
        "class_fraction": {
            str(c.item()): round(k / max(cls.size, 1), 6)
            for c, k in zip(codes, counts, strict=True)
        },
    }
    result = _run_suite(
        MAP_SUITE, frame, _map_expectations(nomenclature, max_nodata_fraction), [], stats
    )
    if previous_fraction is None:
        return result
    mapped = {k: v for k, v in stats["class_fraction"].items() if k != str(NODATA_CODE)}
    total = sum(mapped.values()) or 1.0
    moved = share_changes(
        previous_fraction, {k: v / total for k, v in mapped.items()}, max_share_change
    )
    return dataclasses.replace(
        result, failed_warning=(*result.failed_warning, *moved), evaluated=result.evaluated + 1
    )


def share_changes(before: dict[str, float], after: dict[str, float], tolerance: float) -> list[str]:
    """Classes whose share of the map moved by more than `tolerance` (absolute) between maps."""
    return [
        f"class {code} share {before.get(code, 0.0):.1%} → {after.get(code, 0.0):.1%} since the "
        f"previous published map (more than {tolerance:.0%})"
        for code in sorted(set(before) | set(after), key=int)
        if abs(after.get(code, 0.0) - before.get(code, 0.0)) > tolerance
    ]


def _map_expectations(nomenclature: Nomenclature, max_nodata_fraction: float) -> list[Any]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity
    from great_expectations.expectations.row_conditions import Column

    codes = sorted(nomenclature.codes)
    return [
        gxe.ExpectColumnValuesToBeInSet(
            column=CLASS_COL,
            value_set=[*codes, NODATA_CODE],
            description=f"class codes in {nomenclature.name!r} codes ∪ {{{NODATA_CODE}}}",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=CONFIDENCE_COL,
            min_value=0,
            max_value=100,
            row_condition=Column(name=CLASS_COL) != NODATA_CODE,
            description=f"confidence in [0, 100] where class != {NODATA_CODE}",
        ),
        gxe.ExpectColumnValuesToNotBeInSet(
            column=CLASS_COL,
            value_set=[NODATA_CODE],
            mostly=1.0 - max_nodata_fraction,
            description=f"nodata ({NODATA_CODE}) fraction ≤ {max_nodata_fraction:g}",
        ),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column=CLASS_COL,
            value_set=codes,
            severity=FailureSeverity.WARNING,
            description="every class of the nomenclature present",
        ),
    ]


# --------------------------------------------------------------------------- GX plumbing


def _run_suite(
    suite_name: str,
    frame: pd.DataFrame,
    expectations: list[Any],
    structural: list[str | None],
    statistics: dict,
) -> QualityResult:
    """Run `expectations` on `frame` in an ephemeral GX context; merge the numpy checks."""
    apply_offline_defaults()  # GX analytics off, also when called outside the CLI
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name="pivotmap")
    batch = source.add_dataframe_asset(name=suite_name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
    )
    report = definition.run(batch_parameters={"dataframe": frame}, result_format="BASIC")
    critical = [text for text in structural if text]
    warning: list[str] = []
    for result in report.results:
        if result.success:
            continue
        config = result.expectation_config
        assert config is not None  # results of a suite's run carry their expectation
        text = f"{config.description or config.type}: {_failure_detail(result)}"
        (critical if config.severity == "critical" else warning).append(text)
    statistics = {**statistics, "gx": dict(report.statistics)}
    return QualityResult(
        suite=suite_name,
        success=not critical,
        failed_critical=tuple(critical),
        failed_warning=tuple(warning),
        evaluated=len(report.results) + len(structural),
        statistics=_jsonable(statistics),
    )


def _failure_detail(result: Any) -> str:
    """What went wrong, in words, from one GX ExpectationValidationResult."""
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return f"could not be evaluated ({info.get('exception_message')})"
    res, kind = result.result or {}, result.expectation_config.type
    if kind == "expect_column_values_to_not_be_null":
        return f"{_pct(res.get('unexpected_percent'))} null"
    if kind == "expect_column_values_to_not_be_in_set":
        return f"{_pct(res.get('unexpected_percent'))} of pixels"
    if kind == "expect_column_values_to_be_in_set":
        seen = sorted({_plain(v) for v in res.get("partial_unexpected_list", [])}, key=str)
        return f"{_pct(res.get('unexpected_percent'))} not in the set, e.g. {seen}"
    if "unexpected_percent" in res:
        return f"{_pct(res['unexpected_percent'])} outside"
    if res.get("partial_missing_list"):
        return f"missing {[_plain(v) for v in res['partial_missing_list']]}"
    if "observed_value" in res:
        observed = _plain(res["observed_value"])
        return f"observed {observed:.4g}" if isinstance(observed, float) else f"observed {observed}"
    return "failed"


def _pct(value: float | None) -> str:
    if value is None:
        return "?%"
    return f"{value:.1f}%" if value >= 1 else f"{value:.2g}%"


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _jsonable(value: Any) -> Any:
    """Numpy scalars and nested containers as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------- HTML


def quality_html(result: dict) -> str:
    """A validation result (`QualityResult.to_dict()`) as a self-contained HTML page: verdict,
    failed expectations by severity, Great Expectations statistics and the sample's figures."""
    import html
    import json

    def esc(value: Any) -> str:
        return html.escape(str(value))

    verdict = "passed" if result["success"] else "FAILED"
    colour = "#1a7f37" if result["success"] else "#cf222e"
    rows = [("critical", t) for t in result["failed_critical"]]
    rows += [("warning", t) for t in result["failed_warning"]]
    failed = "".join(f"<tr><td>{esc(s)}</td><td>{esc(t)}</td></tr>" for s, t in rows)
    stats = dict(result.get("statistics", {}))
    gx = stats.pop("gx", {})
    gx_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in gx.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>pivotmap quality: {esc(result['suite'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:left}table{border-collapse:collapse;margin:1em 0}</style>"
        "</head><body>"
        f"<h1>Quality suite <code>{esc(result['suite'])}</code></h1>"
        f"<p style='color:{colour};font-weight:bold'>{verdict}: {result['evaluated']} "
        f"expectations evaluated, {len(result['failed_critical'])} critical and "
        f"{len(result['failed_warning'])} warning failures.</p>"
        "<h2>Failed expectations</h2>"
        + (
            f"<table><tr><th>severity</th><th>expectation</th></tr>{failed}</table>"
            if rows
            else "<p>None.</p>"
        )
        + f"<h2>Great Expectations statistics</h2><table>{gx_rows}</table>"
        "<h2>Sample</h2><pre>"
        + esc(json.dumps(stats, indent=2, sort_keys=True))
        + "</pre></body></html>\n"
    )
