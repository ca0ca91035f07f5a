"""Find Sentinel items in a static STAC catalogue (local or `s3://`) or a STAC API, with clear errors.

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
from urllib.parse import urlsplit

import pystac
from odc.geo.geom import Geometry

RETRY_STATUS = (429, 500, 502, 503, 504)
HrefModifier = Callable[[pystac.Item], pystac.Item | None]


class SourceError(RuntimeError):
    """The STAC source cannot be read or does not hold what the config asks for."""


@dataclass(frozen=True)
class SearchResult:
    """Items kept for one collection, and the ones skipped with their reason."""

    collection: str
    items: list[pystac.Item]
    skipped: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ApiSettings:
    """How a STAC API is called: timeout per request, retries, backoff and page size."""

    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5
    page_size: int | None = None


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
    """Items of `collection` intersecting `region_lonlat` with a datetime within [start, end]."""
    settings = api or ApiSettings(timeout_s=timeout_s)
    if kind == "static":
        items = _static_items(url, collection, settings)
    else:
        items = _api_items(url, collection, region_lonlat, start, end, settings)
    kept = [it for it in items if _in_period(it, start, end) and _intersects(it, region_lonlat)]
    kept = [modify_hrefs(it, href_modifier) for it in kept]
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
    """pystac I/O that also reads `s3://` (boto3; endpoint and credentials from the environment)."""

    def __init__(self) -> None:
        super().__init__()
        self._client = None

    def read_text_from_href(self, href: str) -> str:
        if not href.startswith("s3://"):
            return super().read_text_from_href(href)
        parts = urlsplit(href)
        try:
            body = self._s3().get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"]
            return body.read().decode("utf-8")
        except Exception as exc:
            if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc):
                raise FileNotFoundError(href) from exc
            raise SourceError(
                f"cannot read {href}: {exc} — check AWS_ENDPOINT_URL and the AWS credentials "
                "in the environment"
            ) from exc

    def _s3(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")
        return self._client


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
