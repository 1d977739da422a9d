"""Reading Common Crawl's files from a source: the `s3://commoncrawl/` bucket, an HTTPS mirror
(`https://data.commoncrawl.org/`) or a local directory, each holding `crawl-data/<crawl>/wat.paths.gz` and
the files it lists (paths relative to the source's root).

How often a remote file is tried, at most (`SourceSettings`: `retries`, 4 by default, and `backoff_s`):

- over HTTP(S), `retries + 1` downloads per step attempt, all retried here in one place (`download_http`, with
  tenacity): after a 408, 425, 429 or 5xx answer, a connection error, a timeout or a short read, with delays of
  `backoff_s`, `2 * backoff_s`, `4 * backoff_s`, ...; a download cut off resumes with a Range request where the
  last one stopped. Any other HTTP error (404, 403, ...) fails at once.
- on S3, `retries + 1` tries of each request per step attempt, made by botocore alone (standard retry mode, in the
  client of `s3_client_for`, which the crawl source resource hands on): throttling, 5xx, connection errors and
  timeouts, with botocore's jittered backoff. Nothing here loops around it, and s3transfer's own re-reads of a
  broken body stream are turned off (`num_download_attempts=1`): they would multiply the two. A body cut off
  mid-stream fails the file.

A file still unreadable fails the step (after the chunk's other files, `ExtractSettings.fail_on_unreadable_wat`),
and Dagster's RetryPolicy on the crawl assets (`OperationsSettings.max_retries` retries, 3 by default) runs the step
up to `max_retries + 1` times in its run. So in one run a WAT file is downloaded over HTTP at most
`(retries + 1) * (max_retries + 1)` times, and each S3 request for it is made at most as often: 5 * 4 = 20 with the
defaults. The production instance's run retries (`run_retries.max_retries` in infra/dagster.yaml, 2) relaunch a
failed run, each launch with that bound again: 3 * 20 = 60 there.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import tenacity

from laion_assets.core import paths
from laion_assets.core.settings import USER_AGENT, SourceSettings
from laion_assets.core.storage import S3Options


class WatFetchError(RuntimeError):
    """A WAT file (or listing) that could not be read after retries."""


def join_source(base: str, rel: str) -> str:
    """The location of a path relative to the source root (paths in wat.paths.gz are relative)."""
    if rel.startswith(("s3://", "http://", "https://", "/")):
        return rel
    if base.startswith(("s3://", "http://", "https://")):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(base, rel)


def s3_client_for(settings: SourceSettings) -> Any:
    """An S3 client for the crawl source (credentials and endpoint from boto3's environment) whose requests
    botocore tries at most `settings.retries + 1` times each."""
    return S3Options(max_attempts=settings.retries).client()  # botocore's max_attempts counts retries


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):  # before OSError: HTTPError is one
        return err.code in (408, 425, 429) or err.code >= 500
    # URLError (refused, DNS), resets, timeouts, our short-read ConnectionError; IncompleteRead of a chunked body.
    return isinstance(err, (OSError, http.client.IncompleteRead))


def _http_attempt(url: str, dest: str, settings: SourceSettings) -> None:
    have = os.path.getsize(dest) if os.path.exists(dest) else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=settings.timeout_s) as resp:
        expected = resp.headers.get("Content-Length")
        mode = "ab" if have and resp.status == 206 else "wb"  # a server ignoring Range sends it all again
        got = 0
        with open(dest, mode) as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                got += len(chunk)
        if expected is not None and got < int(expected):
            raise ConnectionError(f"short read: {got} of {expected} bytes")


def download_http(url: str, dest: str, settings: SourceSettings) -> None:
    """Download with at most `retries + 1` attempts (transient errors only); a dropped connection resumes with a
    Range request, and so does a call finding part of the file at `dest` already (the model files' fetch)."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.retries + 1),
        wait=tenacity.wait_exponential(multiplier=settings.backoff_s),
        retry=tenacity.retry_if_exception(_is_transient),
    )
    try:
        retrying(_http_attempt, url, dest, settings)
    except tenacity.RetryError as err:
        last = err.last_attempt.exception()
        raise WatFetchError(f"{url}: failed after {settings.retries + 1} attempts: {last}") from last
    except urllib.error.HTTPError as err:  # not transient, so not retried
        raise WatFetchError(f"{url}: HTTP {err.code}") from err


def _download_s3(uri: str, dest: str, s3_client: Any) -> None:
    import boto3.exceptions
    import botocore.exceptions
    from boto3.s3.transfer import TransferConfig

    bucket, _, key = uri[len("s3://") :].partition("/")
    try:
        s3_client.download_file(bucket, key, dest, Config=TransferConfig(num_download_attempts=1))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error) as err:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "403", "AccessDenied"):
            raise WatFetchError(f"{uri}: {code}") from err
        raise WatFetchError(f"{uri}: {err}") from err  # botocore's message says how often it tried


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
            _download_s3(location, tmp, s3_client or s3_client_for(settings))
        else:
            download_http(location, tmp, settings)
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
        s3_client = s3_client or s3_client_for(settings)
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
