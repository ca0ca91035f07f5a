"""Find Sentinel items in a static STAC catalogue (local or `s3://`) or a STAC API, with clear errors.

Both are `ItemSource`s (`StaticCatalogue`, `StacApi`); `item_source(config.source)` gives the
configured one, and every search keeps only items in the period and region, in time order.
STAC APIs are searched with pystac-client: each request has a timeout, `next` links are followed
(page size `page_size`), and transient faults (429/5xx answers, refused or reset connections, a
database down behind the API) are retried a bounded number of times with exponential backoff
(honouring `Retry-After`) and counted; a request that times out and other 4xx answers are not
retried, and a fault is never reported as "not found". Request headers (e.g. a bearer token) come
from environment variables named in the config (`request_headers`), are sent to the API's host
only, and never appear in logs or errors. `max_cloud_cover` goes to the server as a CQL2 filter
or through the query extension, and items are trimmed with `fields`, when the API's conformance
classes offer them; otherwise the item checks filter here. `find` says which in its `info`. A
static catalogue on http(s) is read with the same timeout, retries and headers (`HttpStacIO`).
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import pystac
from odc.geo.geom import Geometry

from pivotmap.tasks import storage

if TYPE_CHECKING:
    from pivotmap.config import SourceConfig

RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_PAGE_SIZE = 10_000  # the STAC API item-search `limit` maximum (pystac-client refuses more)
# Item fields pivotmap never reads, left out by the server when it offers `fields` (links, and per
# asset of the collection's `item_assets`: band descriptions, checksums, titles).
TRIM_ITEM = ("links",)
TRIM_ASSET = ("eo:bands", "file:checksum", "title", "description")
HrefModifier = Callable[[pystac.Item], pystac.Item | None]


class SourceError(RuntimeError):
    """The STAC source cannot be read or does not hold what the config asks for."""


@dataclass(frozen=True)
class ApiSettings:
    """How a STAC API is called: timeout per request, retries, backoff, page size, request
    headers (secret values: kept out of the repr) and whether filtering may go to the server."""

    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    page_size: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    server_filter: bool = True

    def __post_init__(self) -> None:
        if self.page_size is not None and not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise SourceError(
                f"page size {self.page_size} is outside 1..{MAX_PAGE_SIZE}: the STAC API item "
                "search `limit` allows at most 10000 (servers often cap lower) — set "
                "`source.page_size` to e.g. 100"
            )


@dataclass
class RequestStats:
    """What a source's requests went through: requests made (retries not counted) and retries."""

    requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class Found:
    """A search's items and how it was made (`info`: filtering, trimming, requests, retries)."""

    items: list[pystac.Item]
    info: dict[str, Any]


class ItemSource(Protocol):
    """Where Sentinel items are found: a static catalogue or a STAC API."""

    def search(
        self, collection: str, region_lonlat: Geometry, start: dt.date, end: dt.date
    ) -> list[pystac.Item]: ...

    def find(
        self,
        collection: str,
        region_lonlat: Geometry,
        start: dt.date,
        end: dt.date,
        max_cloud_cover: float | None = None,
    ) -> Found: ...


@dataclass(frozen=True)
class Catalogue:
    """What both kinds of source share: items are filtered, de-duplicated and signed the same way."""

    url: str
    settings: ApiSettings = field(default_factory=ApiSettings)
    href_modifier: HrefModifier | None = None
    kind = "catalogue"

    def search(
        self, collection: str, region_lonlat: Geometry, start: dt.date, end: dt.date
    ) -> list[pystac.Item]:
        """Items of `collection` intersecting `region_lonlat` with a datetime within [start, end]."""
        return self.find(collection, region_lonlat, start, end).items

    def find(
        self,
        collection: str,
        region_lonlat: Geometry,
        start: dt.date,
        end: dt.date,
        max_cloud_cover: float | None = None,
    ) -> Found:
        """`search`, and how: `max_cloud_cover` (S2) may be applied by the server (see `info`
        `cloud_filter`); where it is not, the item checks apply it to what comes back. An item
        id seen twice (pages shifting under a live catalogue) is kept once, the first time."""
        stats = RequestStats()
        info: dict[str, Any] = {"kind": self.kind}
        received = list(self.found(collection, region_lonlat, start, end, max_cloud_cover,
                                   stats, info))  # fmt: skip
        unique = list({it.id: it for it in reversed(received)}.values())[::-1]
        items = _select(unique, region_lonlat, start, end, self.href_modifier)
        info.setdefault("cloud_filter", "client" if max_cloud_cover is not None else "none")
        info.update(
            items_received=len(received), duplicates=len(received) - len(unique),
            requests=stats.requests, retries=stats.retries,
        )  # fmt: skip
        return Found(items, info)

    def found(
        self,
        collection: str,
        region_lonlat: Geometry,
        start: dt.date,
        end: dt.date,
        max_cloud_cover: float | None,
        stats: RequestStats,
        info: dict[str, Any],
    ) -> Iterable[pystac.Item]:
        raise NotImplementedError


class StaticCatalogue(Catalogue):
    """A static STAC catalogue: `catalog.json` as a path, an http(s) or an `s3://` URL."""

    kind = "static"

    def found(self, collection, region_lonlat, start, end, max_cloud_cover, stats, info):
        return _static_items(self.url, collection, self.settings, stats)


class StacApi(Catalogue):
    """A STAC API searched with pystac-client (timeout, paging, headers, bounded retries)."""

    kind = "api"

    def found(self, collection, region_lonlat, start, end, max_cloud_cover, stats, info):
        query = ApiQuery(collection, region_lonlat, start, end, max_cloud_cover)
        return _api_items(self.url, query, self.settings, stats, info)


SOURCE_KINDS: dict[str, type[Catalogue]] = {
    "static": StaticCatalogue,
    "api": StacApi,
}


def item_source(source: SourceConfig) -> Catalogue:
    """The configured source (`source.kind`) with its request settings and href modifier."""
    settings = ApiSettings(
        source.timeout_s, source.max_retries, source.backoff_s, source.page_size,
        request_headers(source), source.server_filter,
    )  # fmt: skip
    modifier = load_href_modifier(source.href_modifier)
    return _source_kind(source.kind)(source.url, settings, modifier)


def request_headers(source: SourceConfig) -> dict[str, str]:
    """The request headers of `source.headers_env` / `source.bearer_token_env`, their values read
    from the environment now. A variable that is not set is an error naming it (not a value)."""
    named = dict(source.headers_env)
    if source.bearer_token_env:
        named["Authorization"] = source.bearer_token_env
    headers = {}
    for header, var in named.items():
        value = os.environ.get(var, "").strip()
        if not value:
            raise SourceError(
                f"environment variable {var} (request header {header!r} of the STAC source) is "
                "not set — export it before the run, or remove it from the `source` config"
            )
        bearer = header == "Authorization" and var == source.bearer_token_env
        headers[header] = f"Bearer {value}" if bearer else value
    return headers


def asset_headers(source: SourceConfig) -> dict[str, str]:
    """The headers COG reads send too (`source.asset_headers`), for `storage.gdal_env`."""
    return request_headers(source) if source.asset_headers else {}


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


def find_items(
    kind: str,
    url: str,
    collection: str,
    region_lonlat: Geometry,
    start: dt.date,
    end: dt.date,
    *,
    api: ApiSettings | None = None,
    max_cloud_cover: float | None = None,
) -> Found:
    """`search_items` with the search's `info` (server-side filtering, requests, retries)."""
    source = _source_kind(kind)(url, api or ApiSettings())
    return source.find(collection, region_lonlat, start, end, max_cloud_cover)


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


def _static_items(
    url: str, collection: str, settings: ApiSettings, stats: RequestStats | None = None
) -> Iterable[pystac.Item]:
    try:
        root = pystac.Catalog.from_file(url, stac_io=_stac_io(url, settings, stats))
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


def _stac_io(
    url: str, settings: ApiSettings, stats: RequestStats | None = None
) -> pystac.StacIO | None:
    if url.startswith(("http://", "https://")):
        return HttpStacIO(settings, stats, _origin(url))
    return S3StacIO() if url.startswith("s3://") else None


class HttpStacIO(pystac.stac_io.DefaultStacIO):
    """pystac I/O for a static catalogue on http(s), with the API's timeout and bounded retries.

    pystac's default reader has neither: one 503, reset connection or short body of a flaky
    web server would stop the run. 429/5xx answers, connection errors and bodies shorter than
    their Content-Length are retried with exponential backoff; a timeout and other 4xx are not.
    The settings' headers go to the catalogue's own host (`origin`) only.
    """

    def __init__(
        self, settings: ApiSettings, stats: RequestStats | None = None, origin: str = ""
    ) -> None:
        import urllib3

        super().__init__()
        self.settings, self.stats, self.origin = settings, stats or RequestStats(), origin
        self._pool = urllib3.PoolManager(retries=False, timeout=settings.timeout_s)

    def read_text_from_href(self, href: str) -> str:
        if not href.startswith(("http://", "https://")):
            return super().read_text_from_href(href)
        import urllib3

        why = ""
        headers = dict(self.settings.headers) if _origin(href) == self.origin else {}
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
            self.stats.requests += 1
            try:  # the whole body, its length checked
                answer = self._pool.request("GET", href, headers=headers or None)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise SourceError(f"cannot read {href}: {exc}") from exc
            except urllib3.exceptions.HTTPError as exc:  # reset, refused, short body
                why = " ".join(str(exc).split())[:200]
                continue
            if answer.status == 404:
                raise FileNotFoundError(href)
            if answer.status in (401, 403):
                raise SourceError(f"cannot read {href}: HTTP {answer.status}{_auth_hint(headers)}")
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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _auth_hint(headers: Mapping[str, str]) -> str:
    if headers:
        return " — the server refused the request headers of `source.headers_env`: check the token"
    return " — the server wants credentials: set `source.headers_env` or `source.bearer_token_env`"


def _retry(settings: ApiSettings):
    from urllib3.exceptions import ReadTimeoutError
    from urllib3.util.retry import Retry

    class NoTimeoutRetry(Retry):
        """Retry, but not a request that timed out: a silent server costs one timeout."""

        def increment(self, *args, error=None, **kwargs):
            if isinstance(error, ReadTimeoutError):
                raise error
            return super().increment(*args, error=error, **kwargs)

    n = settings.max_retries
    return NoTimeoutRetry(
        total=n,
        connect=n,
        read=n,  # a kept-alive connection reset by a restarting server is a read error
        status=n,
        other=0,
        backoff_factor=settings.backoff_s,
        backoff_max=60.0,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "POST"}),  # STAC search by POST is read-only
        respect_retry_after_header=True,
        raise_on_status=False,  # the last answer reaches pystac-client, which names its status
    )


def _adapter(settings: ApiSettings, stats: RequestStats, headers: Mapping[str, str]):
    """A requests adapter with the bounded retries that counts them and adds `headers` after
    pystac-client has logged the request (its debug log prints the session's headers)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.exceptions import MaxRetryError

    class CountingAdapter(HTTPAdapter):
        def send(self, request, *args, **kwargs):
            request.headers.update(headers)
            stats.requests += 1
            try:
                response = super().send(request, *args, **kwargs)
            except requests.ConnectionError as exc:
                if exc.args and isinstance(exc.args[0], MaxRetryError):
                    stats.retries += settings.max_retries
                raise
            stats.retries += len(getattr(getattr(response.raw, "retries", None), "history", ()))
            return response

    return CountingAdapter(max_retries=_retry(settings))


def api_io(settings: ApiSettings, stats: RequestStats | None = None, url: str = ""):
    """A pystac-client StacApiIO with a timeout and bounded, counted retries with backoff on
    429/5xx and connection faults; the settings' headers go to the API's host (`url`) only."""
    from pystac_client.stac_api_io import StacApiIO

    stats = stats or RequestStats()
    io = StacApiIO(timeout=settings.timeout_s, max_retries=None)
    for prefix in ("http://", "https://"):
        io.session.mount(prefix, _adapter(settings, stats, {}))
    if url and settings.headers:
        io.session.mount(_origin(url) + "/", _adapter(settings, stats, settings.headers))
    return io


def _check_api_url(url: str) -> None:
    """A search endpoint or a collection is not an API root: say what to give instead."""
    path = urlsplit(url).path.rstrip("/")
    if path.endswith("/search"):
        raise SourceError(
            f"{url} is the item-search endpoint of a STAC API, not its root — set `source.url` "
            f"to the landing page (e.g. {url[: url.rfind('/search')]}/)"
        )
    found = re.search(r"/collections/([^/]+)(/items)?$", path)
    if found:
        base = url[: url.rfind("/collections/")]
        raise SourceError(
            f"{url} is the collection {found.group(1)!r} of a STAC API, not its root — set "
            f"`source.url` to the landing page ({base}/) and `source.s2_collection` or "
            f"`source.s1_collection` to {found.group(1)!r}"
        )


def open_api(url: str, settings: ApiSettings, stats: RequestStats | None = None):
    """pystac-client Client for `url`; an unreachable API ends in a SourceError naming it."""
    from pystac_client import Client

    _check_api_url(url)
    stats = stats or RequestStats()
    try:
        return Client.open(url, stac_io=api_io(settings, stats, url), timeout=settings.timeout_s)
    except Exception as exc:
        kind = re.search(r"found type=(\w+)", str(exc))
        if kind:
            raise SourceError(
                f"{url} is a {kind.group(1)}, not the landing page (a Catalog) of a STAC API — "
                "set `source.url` to the API root, or use `source.kind: static` for a static "
                "catalogue"
            ) from exc
        auth = getattr(exc, "status_code", None) in (401, 403)
        raise SourceError(
            f"cannot open STAC API {url}: {_reason(exc, settings.headers)} ({_tries(stats)}"
            f"timeout {settings.timeout_s:g} s)"
            + ("" if auth else " — check `source.url` and the network")
        ) from exc


def _tries(stats: RequestStats) -> str:
    return f"after {stats.retries} retries, " if stats.retries else ""


def _after(stats: RequestStats) -> str:
    return f" (after {stats.retries} retries)" if stats.retries else ""


@dataclass(frozen=True)
class ApiQuery:
    """One item search: collection, region, period and the S2 cloud-cover ceiling (or None)."""

    collection: str
    region: Geometry
    start: dt.date
    end: dt.date
    max_cloud_cover: float | None = None


def ccw_geojson(region: Geometry) -> dict:
    """The region as GeoJSON with counter-clockwise exterior rings (RFC 7946)."""
    import shapely
    from shapely.geometry import mapping

    return dict(mapping(shapely.orient_polygons(region.geom, exterior_cw=False)))


def server_options(client, collection, query: ApiQuery, settings: ApiSettings) -> tuple[dict, dict]:
    """Search keywords the API's conformance classes allow (cloud filter, fields), and what was
    chosen: `cloud_filter` is 'cql2-json', 'query', 'client' (the item checks apply it) or
    'none' (no ceiling), `fields` whether items were trimmed by the server."""
    from pystac_client import ConformanceClasses

    kwargs: dict[str, Any] = {}
    info: dict[str, Any] = {"cloud_filter": "none", "fields": False}
    use = settings.server_filter
    if query.max_cloud_cover is not None:
        info["cloud_filter"] = "client"
        prop = {"property": "eo:cloud_cover"}
        if use and client.conforms_to(ConformanceClasses.FILTER):
            # Items without eo:cloud_cover are kept, as the item checks keep them.
            kwargs["filter"] = {"op": "or", "args": [
                {"op": "<=", "args": [prop, query.max_cloud_cover]},
                {"op": "isNull", "args": [prop]},
            ]}  # fmt: skip
            kwargs["filter_lang"] = "cql2-json"
            info["cloud_filter"] = "cql2-json"
        elif use and client.conforms_to(ConformanceClasses.QUERY):
            kwargs["query"] = {"eo:cloud_cover": {"lte": query.max_cloud_cover}}
            info["cloud_filter"] = "query"
    if use and client.conforms_to(ConformanceClasses.FIELDS):
        kwargs["fields"] = {"exclude": trimmed_fields(collection)}
        info["fields"] = True
    return kwargs, info


def trimmed_fields(collection: pystac.Collection) -> list[str]:
    """Fields pivotmap never reads: item links, and band descriptions, checksums and titles of
    the collection's `item_assets` (none of the assets' hrefs, raster:bands or proj: fields)."""
    keys = sorted(collection.extra_fields.get("item_assets") or {})
    return [*TRIM_ITEM, *(f"assets.{k}.{f}" for k in keys for f in TRIM_ASSET)]


def _api_items(
    url: str, query: ApiQuery, api: ApiSettings, stats: RequestStats, info: dict[str, Any]
) -> Iterable[pystac.Item]:
    from pystac_client.exceptions import APIError

    collection = query.collection
    client = open_api(url, api, stats)
    try:
        found = client.get_collection(collection)  # pystac-client answers a 404 with None
    except Exception as exc:  # a fault (after retries), not an absence
        raise SourceError(
            f"cannot read collection {collection!r} from STAC API {url}: "
            f"{_reason(exc, api.headers)}{_after(stats)} — the API or the database behind it "
            "failed; try again later or raise `source.max_retries`"
        ) from exc
    if found is None:
        raise SourceError(
            f"collection {collection!r} not found in STAC API {url} — check `source.*_collection`"
        )
    kwargs, chosen = server_options(client, found, query, api)
    info.update(chosen)
    try:
        try:
            return _search(client, query, api, kwargs)
        except APIError as exc:  # a filter or fields the server announced but refuses
            if not kwargs or getattr(exc, "status_code", None) != 400:
                raise
            info.update(cloud_filter="client" if query.max_cloud_cover is not None else "none",
                        fields=False, server_refused=_reason(exc, api.headers)[:200])  # fmt: skip
            return _search(client, query, api, {})
    except Exception as exc:  # pystac-client raises APIError and bare Exceptions
        raise SourceError(
            f"STAC API {url} search failed for {collection!r}: {_reason(exc, api.headers)}"
            f"{_after(stats)}"
        ) from exc


def _search(client, query: ApiQuery, api: ApiSettings, kwargs: dict) -> list[pystac.Item]:
    search = client.search(
        collections=[query.collection],
        intersects=ccw_geojson(query.region),
        datetime=f"{query.start.isoformat()}/{query.end.isoformat()}T23:59:59Z",
        limit=api.page_size,
        **kwargs,
    )
    return list(search.items())


def _reason(exc: Exception, headers: Mapping[str, str] | None = None) -> str:
    status = getattr(exc, "status_code", None)
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    for value in (headers or {}).values():  # never a secret in an error
        text = text.replace(value, "***")
    hint = _auth_hint(headers or {}) if status in (401, 403) else ""
    return f"HTTP {status}: {text}{hint}" if status else text


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
