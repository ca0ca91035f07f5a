"""Find Sentinel items in a static STAC catalogue or a STAC API, with clear errors."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

import pystac
from odc.geo.geom import Geometry


class SourceError(RuntimeError):
    """The STAC source cannot be read or does not hold what the config asks for."""


@dataclass(frozen=True)
class SearchResult:
    """Items kept for one collection, and the ones skipped with their reason."""

    collection: str
    items: list[pystac.Item]
    skipped: list[dict] = field(default_factory=list)


def search_items(
    kind: str,
    url: str,
    collection: str,
    region_lonlat: Geometry,
    start: dt.date,
    end: dt.date,
    timeout_s: float = 60.0,
) -> list[pystac.Item]:
    """Items of `collection` intersecting `region_lonlat` with a datetime within [start, end]."""
    if kind == "static":
        items = _static_items(url, collection)
    else:
        items = _api_items(url, collection, region_lonlat, start, end, timeout_s)
    kept = [it for it in items if _in_period(it, start, end) and _intersects(it, region_lonlat)]
    return sorted(kept, key=lambda it: (it.datetime, it.id))


def _static_items(url: str, collection: str) -> Iterable[pystac.Item]:
    try:
        root = pystac.Catalog.from_file(url)
    except FileNotFoundError as exc:
        raise SourceError(
            f"STAC catalogue not found: {url} — check `source.url` in the config"
        ) from exc
    except Exception as exc:  # pystac raises many types for unreadable JSON
        raise SourceError(f"cannot read STAC catalogue {url}: {exc}") from exc
    children = {child.id: child for child in root.get_children()}
    if collection not in children:
        raise SourceError(
            f"collection {collection!r} is not in catalogue {url} "
            f"(it has: {', '.join(sorted(children)) or 'none'}) — check `source.*_collection`"
        )
    return children[collection].get_items(recursive=True)


def _api_items(
    url: str, collection: str, region: Geometry, start: dt.date, end: dt.date, timeout_s: float
) -> Iterable[pystac.Item]:
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(url, timeout=timeout_s)
    except Exception as exc:
        raise SourceError(f"cannot open STAC API {url}: {exc} — check `source.url`") from exc
    try:
        client.get_collection(collection)
    except Exception as exc:
        raise SourceError(f"collection {collection!r} not found in STAC API {url}: {exc}") from exc
    try:
        search = client.search(
            collections=[collection],
            intersects=region.json,
            datetime=f"{start.isoformat()}/{end.isoformat()}T23:59:59Z",
        )
        return list(search.items())
    except APIError as exc:
        raise SourceError(f"STAC API {url} search failed for {collection!r}: {exc}") from exc


def _in_period(item: pystac.Item, start: dt.date, end: dt.date) -> bool:
    when = item.datetime or item.common_metadata.start_datetime
    return when is not None and start <= when.astimezone(dt.UTC).date() <= end


def _intersects(item: pystac.Item, region_lonlat: Geometry) -> bool:
    if item.geometry is None:
        return True
    return Geometry(item.geometry, crs="EPSG:4326").intersects(region_lonlat)


def require_items(
    items: list[pystac.Item], collection: str, url: str, start: dt.date, end: dt.date
) -> None:
    """A run over an empty period cannot make a map: stop with the inputs named."""
    if not items:
        raise SourceError(
            f"no items of {collection!r} in {url} intersect the region between {start} and {end} — "
            "check `region`, `period` and the collection id"
        )
