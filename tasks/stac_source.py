"""Find Sentinel items in a static STAC catalogue (local or `s3://`) or a STAC API, with clear errors.

Both are `ItemSource`s (`StaticCatalogue`, `StacApi`); `item_source(config.source)` gives the
configured one, and every search keeps only items in the period and region, in time order.
STAC APIs are searched with pystac-client: each request has a timeout, `next` links are followed
(page size `page_size`), and 429/5xx answers are retried a bounded number of times with
exponential backoff (honouring `Retry-After`); connection failures are retried the same bounded
number of times; a request that times out and other 4xx answers are not retried. A static
catalogue on http(s) is read with the same timeout and retries (`HttpStacIO`), short bodies too.
"""

from __future__ import annotations

import datetime as dt
import importlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import pystac
from odc.geo.geom import Geometry

from pivotmap.tasks import storage

if TYPE_CHECKING:
    from pivotmap.config import SourceConfig

RETRY_STATUS = (429, 500, 502, 503, 504)
HrefModifier = Callable[[pystac.Item], pystac.Item | None]


class SourceError(RuntimeError):
    """The STAC source cannot be read or does not hold what the config asks for."""


@dataclass(frozen=True)
class ApiSettings:
    """How a STAC API is called: timeout per request, retries, backoff and page size."""

    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    page_size: int | None = None


class ItemSource(Protocol):
    """Where Sentinel items are found: a static catalogue or a STAC API."""

    def search(
        self, collection: str, region_lonlat: Geometry, start: dt.date, end: dt.date
    ) -> list[pystac.Item]: ...


@dataclass(frozen=True)
class Catalogue:
    """What both kinds of source share: items are filtered and signed the same way."""

    url: str
    settings: ApiSettings = field(default_factory=ApiSettings)
    href_modifier: HrefModifier | None = None

    def search(
        self, collection: str, region_lonlat: Geometry, start: dt.date, end: dt.date
    ) -> list[pystac.Item]:
        """Items of `collection` intersecting `region_lonlat` with a datetime within [start, end]."""
        found = self.found(collection, region_lonlat, start, end)
        return _select(found, region_lonlat, start, end, self.href_modifier)

    def found(
        self, collection: str, region_lonlat: Geometry, start: dt.date, end: dt.date
    ) -> Iterable[pystac.Item]:
        raise NotImplementedError


class StaticCatalogue(Catalogue):
    """A static STAC catalogue: `catalog.json` as a path, an http(s) or an `s3://` URL."""

    def found(self, collection, region_lonlat, start, end) -> Iterable[pystac.Item]:
        return _static_items(self.url, collection, self.settings)


class StacApi(Catalogue):
    """A STAC API searched with pystac-client (timeout, paging and bounded retries)."""

    def found(self, collection, region_lonlat, start, end) -> Iterable[pystac.Item]:
        return _api_items(self.url, collection, region_lonlat, start, end, self.settings)


SOURCE_KINDS: dict[str, type[Catalogue]] = {
    "static": StaticCatalogue,
    "api": StacApi,
}


def item_source(source: SourceConfig) -> ItemSource:
    """The configured source (`source.kind`) with its request settings and href modifier."""
    settings = ApiSettings(source.timeout_s, source.max_retries, source.backoff_s, source.page_size)
    modifier = load_href_modifier(source.href_modifier)
    return _source_kind(source.kind)(source.url, settings, modifier)


def search_items(
    kind: str,
    url: str,
    collection: str,
    region_lonlat: Geometry,
    start: dt.date,
    end: dt.date,
    timeout_s: float = 60.0,
    *,
    api: ApiSettings | None = None,
    href_modifier: HrefModifier | None = None,
) -> list[pystac.Item]:
    """One search without a run config (scripts, tests): the `kind` source's `search`."""
    source = _source_kind(kind)(url, api or ApiSettings(timeout_s=timeout_s), href_modifier)
    return source.search(collection, region_lonlat, start, end)


def _source_kind(kind: str) -> type[Catalogue]:
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source kind {kind!r}: use one of {', '.join(SOURCE_KINDS)}")
    return SOURCE_KINDS[kind]


def _select(
    items: Iterable[pystac.Item],
    region_lonlat: Geometry,
    start: dt.date,
    end: dt.date,
    modifier: HrefModifier | None,
) -> list[pystac.Item]:
    """The items in the period and region, hrefs modified, in (datetime, id) order."""
    kept = [it for it in items if _in_period(it, start, end) and _intersects(it, region_lonlat)]
    kept = [modify_hrefs(it, modifier) for it in kept]
    return sorted(kept, key=lambda it: (it.datetime or it.common_metadata.start_datetime, it.id))


def load_href_modifier(spec: str | None) -> HrefModifier | None:
    """The callable named `module:function` (e.g. `planetary_computer:sign_inplace`), or None."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SourceError(
            f"href modifier {spec!r} cannot be imported ({exc}) — set `source.href_modifier` to "
            "'package.module:function' of an installed package"
        ) from exc
    if not callable(func):
        raise SourceError(f"href modifier {spec!r} is not callable")
    return func


def modify_hrefs(item: pystac.Item, modifier: HrefModifier | None) -> pystac.Item:
    """Apply `modifier` (in place or returning a new item, like planetary_computer.sign)."""
    if modifier is None:
        return item
    result = modifier(item)
    return result if isinstance(result, pystac.Item) else item


# ---------------------------------------------------------------------------- static catalogues


def _static_items(url: str, collection: str, settings: ApiSettings) -> Iterable[pystac.Item]:
    try:
        root = pystac.Catalog.from_file(url, stac_io=_stac_io(url, settings))
    except FileNotFoundError as exc:
        raise SourceError(
            f"STAC catalogue not found: {url} — check `source.url` in the config"
        ) from exc
    except SourceError:
        raise
    except Exception as exc:  # pystac raises many types for unreadable JSON
        raise SourceError(f"cannot read STAC catalogue {url}: {exc}") from exc
    children = {child.id: child for child in root.get_children()}
    if collection not in children:
        raise SourceError(
            f"collection {collection!r} is not in catalogue {url} "
            f"(it has: {', '.join(sorted(children)) or 'none'}) — check `source.*_collection`"
        )
    try:
        return list(children[collection].get_items(recursive=True))
    except pystac.STACError as exc:  # an unreadable item: say why, not only which
        raise SourceError(f"{exc}: {exc.__cause__ or 'unreadable'}") from exc


def _stac_io(url: str, settings: ApiSettings) -> pystac.StacIO | None:
    if url.startswith(("http://", "https://")):
        return HttpStacIO(settings)
    return S3StacIO() if url.startswith("s3://") else None


class HttpStacIO(pystac.stac_io.DefaultStacIO):
    """pystac I/O for a static catalogue on http(s), with the API's timeout and bounded retries.

    pystac's default reader has neither: one 503, reset connection or short body of a flaky
    web server would stop the run. 429/5xx answers, connection errors and bodies shorter than
    their Content-Length are retried with exponential backoff; a timeout and other 4xx are not.
    """

    def __init__(self, settings: ApiSettings) -> None:
        import urllib3

        super().__init__()
        self.settings = settings
        self._pool = urllib3.PoolManager(retries=False, timeout=settings.timeout_s)

    def read_text_from_href(self, href: str) -> str:
        if not href.startswith(("http://", "https://")):
            return super().read_text_from_href(href)
        import urllib3

        why = ""
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                time.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self._pool.request("GET", href)  # the whole body, its length checked
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise SourceError(f"cannot read {href}: {exc}") from exc
            except urllib3.exceptions.HTTPError as exc:  # reset, refused, short body
                why = " ".join(str(exc).split())[:200]
                continue
            if answer.status == 404:
                raise FileNotFoundError(href)
            if answer.status not in RETRY_STATUS:
                if answer.status >= 400:
                    raise SourceError(f"cannot read {href}: HTTP {answer.status}")
                return answer.data.decode("utf-8")
            why = f"HTTP {answer.status}"
        raise SourceError(f"cannot read {href}: {why} (after {self.settings.max_retries} retries)")


class S3StacIO(pystac.stac_io.DefaultStacIO):
    """pystac I/O that also reads `s3://` (through `tasks.storage`; endpoint and credentials
    from the environment)."""

    def read_text_from_href(self, href: str) -> str:
        if not href.startswith("s3://"):
            return super().read_text_from_href(href)
        try:
            return storage.read_bytes(href).decode("utf-8")
        except storage.NotFound:
            raise  # a FileNotFoundError: the caller names the missing catalogue
        except storage.StorageError as exc:
            raise SourceError(
                f"{exc} — check AWS_ENDPOINT_URL and the AWS credentials in the environment"
            ) from exc


# ---------------------------------------------------------------------------- STAC APIs


def api_io(settings: ApiSettings):
    """A pystac-client StacApiIO with a timeout and bounded retries with backoff on 429/5xx."""
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    retry = Retry(
        total=settings.max_retries,
        connect=settings.max_retries,
        read=0,
        status=settings.max_retries,
        other=0,
        backoff_factor=settings.backoff_s,
        backoff_max=60.0,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "POST"}),  # STAC search by POST is read-only
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer reaches pystac-client, which names its status
    )
    return StacApiIO(timeout=settings.timeout_s, max_retries=retry)


def open_api(url: str, settings: ApiSettings):
    """pystac-client Client for `url`; an unreachable API ends in a SourceError naming it."""
    from pystac_client import Client

    try:
        return Client.open(url, stac_io=api_io(settings), timeout=settings.timeout_s)
    except Exception as exc:
        raise SourceError(
            f"cannot open STAC API {url}: {_reason(exc)} (after {settings.max_retries} retries, "
            f"timeout {settings.timeout_s:g} s) — check `source.url` and the network"
        ) from exc


def _api_items(
    url: str, collection: str, region: Geometry, start: dt.date, end: dt.date, api: ApiSettings
) -> Iterable[pystac.Item]:
    from pystac_client.exceptions import APIError

    client = open_api(url, api)
    try:
        found = client.get_collection(collection)  # pystac-client answers a 404 with None
    except Exception as exc:
        raise SourceError(
            f"collection {collection!r} not found in STAC API {url}: {_reason(exc)}"
        ) from exc
    if found is None:
        raise SourceError(
            f"collection {collection!r} not found in STAC API {url} — check `source.*_collection`"
        )
    try:
        search = client.search(
            collections=[collection],
            intersects=region.json,
            datetime=f"{start.isoformat()}/{end.isoformat()}T23:59:59Z",
            limit=api.page_size,
        )
        return list(search.items())
    except APIError as exc:
        raise SourceError(
            f"STAC API {url} search failed for {collection!r}: {_reason(exc)}"
        ) from exc


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    return f"HTTP {status}: {text}" if status else text


# ---------------------------------------------------------------------------- filters


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
