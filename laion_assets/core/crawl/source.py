"""Reading Common Crawl's files from a source: the `s3://commoncrawl/` bucket, an HTTPS mirror
(`https://data.commoncrawl.org/`) or a local directory, each holding `crawl-data/<crawl>/wat.paths.gz` and
the files it lists (paths relative to the source's root).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from laion_assets.core import paths
from laion_assets.core.settings import USER_AGENT, SourceSettings


class WatFetchError(RuntimeError):
    """A WAT file (or listing) that could not be read after retries."""


def join_source(base: str, rel: str) -> str:
    """The location of a path relative to the source root (paths in wat.paths.gz are relative)."""
    if rel.startswith(("s3://", "http://", "https://", "/")):
        return rel
    if base.startswith(("s3://", "http://", "https://")):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(base, rel)


def _is_transient_http(err: urllib.error.HTTPError) -> bool:
    return err.code in (408, 425, 429) or err.code >= 500


def _download_http(url: str, dest: str, settings: SourceSettings) -> None:
    """Download with retries; a dropped connection resumes with a Range request."""
    last: Exception | None = None
    for attempt in range(settings.retries + 1):
        have = os.path.getsize(dest) if os.path.exists(dest) else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=settings.timeout_s) as resp:
                expected = resp.headers.get("Content-Length")
                mode = "ab" if have and resp.status == 206 else "wb"
                got = 0
                with open(dest, mode) as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        got += len(chunk)
                if expected is not None and got < int(expected):
                    raise ConnectionError(f"short read: {got} of {expected} bytes")
                return
        except urllib.error.HTTPError as err:
            if not _is_transient_http(err):
                raise WatFetchError(f"{url}: HTTP {err.code}") from err
            last = err
        except (OSError, ConnectionError) as err:  # URLError, timeouts, resets, short reads
            last = err
        if attempt < settings.retries:
            time.sleep(settings.backoff_s * 2**attempt)
    raise WatFetchError(f"{url}: failed after {settings.retries + 1} attempts: {last}")


def _download_s3(uri: str, dest: str, settings: SourceSettings, s3_client: Any) -> None:
    bucket, _, key = uri[len("s3://") :].partition("/")
    last: Exception | None = None
    for attempt in range(settings.retries + 1):
        try:
            s3_client.download_file(bucket, key, dest)
            return
        except Exception as err:  # botocore raises many types; all are worth a retry except 404
            code = getattr(err, "response", {}).get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "403", "AccessDenied"):
                raise WatFetchError(f"{uri}: {code}") from err
            last = err
        if attempt < settings.retries:
            time.sleep(settings.backoff_s * 2**attempt)
    raise WatFetchError(f"{uri}: failed after {settings.retries + 1} attempts: {last}")


@contextlib.contextmanager
def fetched(location: str, settings: SourceSettings, s3_client: Any = None) -> Iterator[str]:
    """A local, seekable path holding the file at location (downloaded to a temporary file if remote)."""
    if not location.startswith(("s3://", "http://", "https://")):
        if not os.path.isfile(location):
            raise WatFetchError(f"{location}: no such file")
        yield location
        return
    fd, tmp = tempfile.mkstemp(prefix="laion-wat-", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)  # the downloader decides between append (resume) and a fresh file
    try:
        if location.startswith("s3://"):
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3")
            _download_s3(location, tmp, settings, s3_client)
        else:
            _download_http(location, tmp, settings)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_listing(crawl: str, settings: SourceSettings, s3_client: Any = None) -> list[str]:
    """The WAT paths of a crawl, from `crawl-data/<crawl>/wat.paths.gz`, in listing order."""
    location = join_source(settings.base, paths.wat_listing(crawl))
    with fetched(location, settings, s3_client) as path, gzip.open(path, "rt") as fh:
        return [line.strip() for line in fh if line.strip()]


COLLINFO = "https://index.commoncrawl.org/collinfo.json"


def list_crawls(settings: SourceSettings, s3_client: Any = None) -> list[str]:
    """The crawl IDs a source offers, sorted: the folders of a local mirror's `crawl-data/` that hold a
    `wat.paths.gz`, the `crawl-data/` prefixes of an S3 bucket, or Common Crawl's `collinfo.json` (or the mirror's
    own `collinfo.json`) for an HTTPS source."""
    import json

    base = settings.base
    if base.startswith("s3://"):
        bucket, _, prefix = base[len("s3://"):].partition("/")
        prefix = f"{prefix.strip('/')}/{paths.crawl_data()}/".lstrip("/")
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3")
        found = []
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            found += [p["Prefix"][len(prefix):].strip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(found)
    if base.startswith(("http://", "https://")):
        url = COLLINFO if "data.commoncrawl.org" in base else join_source(base, "collinfo.json")
        with fetched(url, settings) as local, open(local) as fh:
            return sorted(entry["id"] for entry in json.load(fh))
    root = os.path.join(base, paths.crawl_data())
    if not os.path.isdir(root):
        return []
    return sorted(c for c in os.listdir(root) if os.path.isfile(os.path.join(base, paths.wat_listing(c))))
