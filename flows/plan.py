"""`pivotmap plan`: what a run will cost before it runs (tiles, items, bytes, core-hours, storage).

Reads the config, the region outline and the catalogue's item metadata, never a pixel. A plain
function, not a Prefect flow: it answers in seconds and starts nothing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from pivotmap.config import RunConfig
from pivotmap.rates import load_rates
from pivotmap.tasks import plan as est
from pivotmap.tasks.region import region_geometry
from pivotmap.tasks.stac_source import SourceError, item_source


def plan(config: RunConfig, offline: bool = False, rates_file: str | None = None) -> dict:
    """The plan of `config` as a JSON-ready summary; every estimate names its rate and source."""
    rates = load_rates(rates_file)
    r = config.region
    geom = region_geometry(**r.model_dump())  # its keywords are RegionConfig's fields
    cover = est.tile_cover(config.grid.spec(), geom)
    area_km2 = cover.pixels * config.grid.resolution**2 / 1e6
    days = config.period.days
    src = config.source
    found = (("s2", src.s2_collection), ("s1", src.s1_collection))
    collections = {m: c for m, c in found if c}
    modalities = list(collections)
    if offline:
        obs = {m: est.assumed_observations(m, days, area_km2) for m in modalities}
    else:
        lonlat = cover.footprint.to_crs("EPSG:4326")
        obs = {m: _searched(config, m, collections[m], lonlat) for m in modalities}
    size = est.Sizing(
        pixels=cover.pixels,
        days=days,
        pivot_variables=sum(est.OBS_VARIABLES[m] + 1 for m in modalities),  # bands + age
        train_pixel_epochs=train_pixel_epochs(config),
        obs=obs,
        pivot_method=config.pivot.method,
    )
    costs = est.stage_costs(size, rates)
    stored = est.storage(size, rates)
    return {
        "ok": True,
        "command": "plan",
        "config": config.name,
        "tiles": cover.tiles,
        "tile_size": config.grid.tile_size,
        "pixels": cover.pixels,
        "area_km2": round(area_km2, 3),
        "days": days,
        "period": [config.period.start.isoformat(), config.period.end.isoformat()],
        "offline": offline,
        "items": {m: _obs_dict(o, collections[m]) for m, o in obs.items()},
        "stages": costs,
        "bytes": stored,
        "total": est.totals(costs, stored),
        "rates": {
            k: {"value": v.value, "unit": v.unit, "source": v.source} for k, v in rates.items()
        },  # fmt: skip
    }


def train_pixel_epochs(config: RunConfig) -> float:
    """Pixel-epochs training works through: fine-tuning (of each ensemble member),
    pretraining and distillation."""
    t = config.train
    labelled = t.epochs * t.max_train_pixels * t.label_fraction * t.ensemble_members
    return labelled + (t.pretrain_epochs + t.distill_epochs) * t.max_unlabelled_pixels


def _searched(config: RunConfig, modality: str, collection: str, lonlat) -> est.Observations:
    period, url = config.period, config.source.url
    try:
        items = item_source(config.source).search(collection, lonlat, period.start, period.end)
    except Exception as exc:  # any failure to reach or read the catalogue ends the same way
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise SourceError(
            f"catalogue {url} could not be searched for {collection!r}: {reason}; or run "
            "`pivotmap plan --offline` to estimate items from the revisit instead"
        ) from exc
    return est.observations(modality, items, lonlat)


def _obs_dict(o: est.Observations, collection: str) -> dict:
    return {
        "collection": collection,
        "items": o.items,
        "dates": o.dates,
        "observations_per_pixel": round(o.per_pixel, 3),
        "basis": o.basis,
    }


# ---------------------------------------------------------------------------- for people


def plan_text(summary: dict) -> str:
    """The plan as a compact table; each estimate's rate is footnoted with where it came from."""
    from rich.console import Console
    from rich.table import Table

    head = (
        f"plan {summary['config']}: {summary['tiles']} tiles of {summary['tile_size']} px, "
        f"{summary['pixels']:,} px ({summary['area_km2']:.4g} km²), {summary['days']} days "
        f"{summary['period'][0]}..{summary['period'][1]}"
    )
    items = [
        f"{m.upper()}: {o['items']} items, {o['dates']} dates, "
        f"{o['observations_per_pixel']:.3g} obs/px ({o['basis']})"
        for m, o in summary["items"].items()
    ]
    notes: dict[str, int] = {}
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("estimate", "value", "rate", "from"):
        table.add_column(name)
    for stage, c in summary["stages"].items():
        table.add_row(f"{stage} core-h", _num(c["core_hours"]), *_rate(c["cpu"], notes))
        if c["gpu"] is not None:
            table.add_row(f"{stage} GPU-h", _num(c["gpu_hours"]), *_rate(c["gpu"], notes))
    for key, b in summary["bytes"].items():
        name = key.replace("_", " ") + (" (estimated)" if b.get("estimated") else "")
        table.add_row(name, _size(b["value"]), *_rate(b, notes))
    total = summary["total"]
    skipped = ", ".join(total["core_hours_not_measured"]) or "none"
    table.add_row("total core-h", _num(total["core_hours"]), f"not measured: {skipped}", "")
    table.add_row("total GPU-h", _num(total["gpu_hours"]), "", "")
    table.add_row("total read", _size(total["bytes_read"]), "", "")
    table.add_row("total storage", _size(total["storage_bytes"]), "obs + pivot + products", "")
    out = io.StringIO()
    Console(file=out, width=120, no_color=True, highlight=False).print(table)
    sources = [f"  [{n}] {source}" for source, n in notes.items()]
    return "\n".join([head, *items, out.getvalue().rstrip(), *sources])


def _num(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3g}"


def _size(value: float | None) -> str:
    if value is None:
        return "not measured"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _rate(f: Mapping, notes: dict[str, int]) -> tuple[str, str]:
    """(the rate with its unit, its footnote number): sources are long and shared by rows."""
    note = notes.setdefault(f["source"], len(notes) + 1)
    rate = f["unit"] if f.get("rate") is None else f"{f['rate']:.4g} {f['unit']}"
    return rate, f"[{note}]"
