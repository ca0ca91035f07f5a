"""One place for storage URLs: local paths, `file://` and `s3://` (boto3; endpoint and credentials
from the environment, never from code, config or logs)."""

from __future__ import annotations

import hashlib
import mimetypes
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

SHA_KEY = "sha256"  # object metadata key holding the content hash (idempotent uploads)


class StorageError(RuntimeError):
    """A storage URL is invalid, unreachable or refused the operation."""


class NotFound(StorageError, FileNotFoundError):
    """No file or object at that URL."""


@dataclass(frozen=True)
class Location:
    """A parsed storage URL: `scheme` is 'file' or 's3'; `path` a local path or an S3 key prefix."""

    scheme: str
    bucket: str
    path: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def join(self, *parts: str) -> Location:
        for part in parts:
            _check_relative(part)
        if self.is_s3:
            key = "/".join(p.strip("/") for p in (self.path, *parts) if p.strip("/"))
            return Location("s3", self.bucket, key)
        return Location("file", "", str(Path(self.path, *parts)))

    def url(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.is_s3 else self.path


def parse(url: str) -> Location:
    """Normalise a bare path, `file://` URL or `s3://bucket/prefix` once, at the boundary."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{url!r} has no bucket: write s3://BUCKET/PREFIX")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme in ("", "file"):
        return Location("file", "", str(Path(parsed.path if parsed.scheme else url).resolve()))
    raise StorageError(f"unsupported storage URL {url!r}: use a path, file:// or s3://")


def _check_relative(part: str) -> None:
    """Keys built from names (regions, versions, tiles) must not escape their prefix."""
    pure = PurePosixPath(part)
    if pure.is_absolute() or ".." in pure.parts or "\\" in part:
        raise StorageError(f"path component {part!r} would escape its prefix")


def s3_client():
    """A boto3 S3 client configured only from the environment (AWS_* variables, AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(where: str | Location) -> bytes:
    """The bytes of a file or object; a missing one raises `NotFound` (a FileNotFoundError)."""
    loc = parse(where) if isinstance(where, str) else where
    if loc.is_s3:
        try:
            return s3_client().get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read()
        except Exception as exc:
            if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc):
                raise NotFound(f"{loc.url()} does not exist") from exc
            raise StorageError(f"cannot read {loc.url()}: {_safe(exc)}") from exc
    try:
        return Path(loc.path).read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"{loc.url()} does not exist") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {loc.url()}: {exc.strerror}") from exc


def download(loc: Location, dest: Path) -> Path:
    """Copy one object or file to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if loc.is_s3:
        try:
            s3_client().download_file(loc.bucket, loc.path, str(dest))
        except Exception as exc:
            raise StorageError(f"cannot download {loc.url()}: {_safe(exc)}") from exc
    else:
        shutil.copyfile(loc.path, dest)
    return dest


def upload_tree(
    local: Path, target: Location, on_file: Callable[[Path], None] | None = None
) -> dict:
    """Upload every file under `local` to `target`/<relative path>; identical objects are skipped."""
    client = s3_client()
    existing = _existing_hashes(client, target)
    sent = skipped = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        key = target.join(rel).path
        digest = sha256_file(path)
        if existing.get(key) == digest:
            skipped += 1
        else:
            put_file(client, path, target.bucket, key, digest)
            sent += 1
        if on_file:
            on_file(path)
    return {"uploaded": sent, "unchanged": skipped}


def put_file(client, path: Path, bucket: str, key: str, digest: str | None = None) -> None:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".tif":
        content_type = "image/tiff; application=geotiff; profile=cloud-optimized"
    try:
        client.upload_file(
            str(path), bucket, key,
            ExtraArgs={"ContentType": content_type, "Metadata": {SHA_KEY: digest or sha256_file(path)}},
        )  # fmt: skip
    except Exception as exc:
        raise StorageError(
            f"cannot upload {path.name} to s3://{bucket}/{key}: {_safe(exc)}"
        ) from exc


def _existing_hashes(client, target: Location) -> dict[str, str]:
    """Hashes of objects already under `target` (from their metadata)."""
    hashes = {}
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=target.bucket, Prefix=target.path.rstrip("/") + "/"
        )
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        for key in keys:
            head = client.head_object(Bucket=target.bucket, Key=key)
            if SHA_KEY in head.get("Metadata", {}):
                hashes[key] = head["Metadata"][SHA_KEY]
    except Exception as exc:
        raise StorageError(f"cannot list s3://{target.bucket}/{target.path}: {_safe(exc)}") from exc
    return hashes


def _safe(exc: Exception) -> str:
    """An error text without anything that looks like a credential."""
    text = " ".join(str(exc).split())
    for marker in ("Signature=", "X-Amz-Credential=", "X-Amz-Security-Token="):
        if marker in text:
            text = text.split(marker)[0] + marker + "…"
    return text


# ---------------------------------------------------------------------------- run-folder URLs
# The run folder and everything in it (cubes, state markers, results, maps, models, reports)
# are URLs: a local path or `s3://bucket/prefix`. fsspec gives one API over both; S3 goes
# through s3fs, configured only from the environment like boto3.


def url_error(exc: BaseException) -> str:
    """An HTTP or URL error in a few words (the status, or the OS reason), for one-line errors."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(getattr(exc.reason, "strerror", None) or exc.reason)
    return " ".join(str(exc).split()) or type(exc).__name__


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def normalise(url: str) -> str:
    """A bare path or `file://` URL as an absolute path; `s3://bucket/prefix` without a
    trailing slash. Other schemes are refused with the URL named."""
    loc = parse(url)
    return loc.url().rstrip("/") if loc.is_s3 else loc.path


def join(url: str, *parts: str) -> str:
    """`url`/part/…; parts are names, never absolute or with `..`."""
    return parse(url).join(*parts).url()


def _fs(url: str):
    import fsspec

    if is_remote(url):
        return fsspec.filesystem(parse(url).scheme), url
    return fsspec.filesystem("file"), parse(url).path


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return bool(fs.exists(path))


def makedirs(url: str) -> None:
    """Create a local folder (object stores have no folders: nothing to do)."""
    if not is_remote(url):
        Path(parse(url).path).mkdir(parents=True, exist_ok=True)


def read_text_or_none(url: str) -> str | None:
    """The text at `url`, or None when there is no such file."""
    try:
        return read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file; a reader sees the old or the new content, never a part."""
    if is_remote(url):
        fs, path = _fs(url)
        try:
            fs.pipe_file(path, data)  # one PUT: objects are replaced whole
        except Exception as exc:
            raise StorageError(f"cannot write {url}: {_safe(exc)}") from exc
        return
    _replace_local(Path(parse(url).path), lambda tmp: tmp.write_bytes(data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def remove_tree(url: str) -> None:
    """Remove a file or a folder and all under it; nothing there is fine."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, pattern: str = "*") -> list[str]:
    """URLs of the files directly under folder `url` whose names match `pattern`."""
    fs, path = _fs(url)
    found = fs.glob(f"{path.rstrip('/')}/{pattern}")
    if is_remote(url):
        return sorted(f"{parse(url).scheme}://{p}" for p in found)
    return sorted(str(p) for p in found)


def copy_file(local: Path, url: str) -> None:
    """Copy a local file to `url` (atomically on a local target)."""
    if is_remote(url):
        write_bytes(url, local.read_bytes())
        return
    dest = Path(parse(url).path)
    if dest.resolve() != local.resolve():
        _replace_local(dest, lambda tmp: shutil.copyfile(local, tmp))


def _replace_local(path: Path, fill: Callable[[Path], object]) -> None:
    """Write `path` through a hidden temporary file renamed over it: never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fill(tmp)
    tmp.replace(path)


def local_path(url: str) -> Path:
    """The local path of a local URL; a clear error for a remote one."""
    if is_remote(url):
        raise StorageError(f"{url} is not on this machine: this step needs a local folder")
    return Path(parse(url).path)


# ---------------------------------------------------------------------------- GDAL/AWS settings
# Readers (rasterio/GDAL on Dask workers) get these as an explicit, secret-free dict that each
# task enters, never as worker globals; credentials come from each worker's own environment.

GDAL_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    # Ingest keeps up to 1024 COGs open across batches (`load.OpenCogs`): a per-file read
    # cache (VSI_CACHE, up to 25 MB a file) would grow with them, so it is off (remote reads
    # still share /vsicurl's own cache).
    "VSI_CACHE": "FALSE",
}
GDAL_PASSED_THROUGH = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_NO_SIGN_REQUEST",
    "AWS_REQUEST_PAYER",
)


def gdal_env(
    overrides: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> dict[str, str]:
    """GDAL/AWS settings for readers, from this process's environment; no secrets but `headers`.

    A `GDAL_DEFAULTS` key set in the environment (e.g. `GDAL_HTTP_MAX_RETRY`) overrides it.

    `AWS_ENDPOINT_URL(_S3)` (an S3-compatible store) becomes GDAL's endpoint, scheme and
    path-style addressing. Access keys are left to each worker's environment.

    `headers` (the STAC source's request headers, `stac_source.asset_headers`: values read from
    the environment variables the config names) become `GDAL_HTTP_HEADERS`, sent with every
    http(s) COG read; the dict then holds them, so it must never be logged.
    """
    import os

    env = {k: os.environ.get(k, v) for k, v in GDAL_DEFAULTS.items()}  # the operator's win
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlparse(endpoint)
        env["AWS_S3_ENDPOINT"] = parts.netloc or parts.path
        env["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        env["AWS_VIRTUAL_HOSTING"] = "FALSE"
    env.update({k: os.environ[k] for k in GDAL_PASSED_THROUGH if os.environ.get(k)})
    if headers:  # GDAL >= 3.6: "Name: value" pairs, comma-separated, quoted and escaped
        pairs = (f"{k}: {v}".replace("\\", "\\\\").replace('"', '\\"') for k, v in headers.items())
        env["GDAL_HTTP_HEADERS"] = ",".join(f'"{pair}"' for pair in pairs)
    env.update(overrides or {})
    return env
