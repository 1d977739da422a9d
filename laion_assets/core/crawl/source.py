"""Reading Common Crawl's files from a source: the `s3://commoncrawl/` bucket, an HTTPS mirror
(`https://data.commoncrawl.org/`) or a local directory, each holding `crawl-data/<crawl>/wat.paths.gz` and
the files it lists (paths relative to the source's root).

How often a remote file is tried, at most (`SourceSettings`: `retries`, 4 by default, and `backoff_s`):

- over HTTP(S), `retries + 1` downloads per step attempt, all retried here in one place (`download_http`): after
  a 408, 425, 429 or 5xx answer, a connection error, a timeout or a short read, with delays of about `backoff_s`,
  `2 * backoff_s`, `4 * backoff_s`, ... (jittered by +-50%); a download cut off resumes with a Range request where
  the last one stopped. Any other HTTP error (404, 403, ...) fails at once. Common Crawl's endpoint answers bursts
  with 503 "Slow Down": requests to one source keep one rate (`requests_per_s`, per process), a 429 or 503 halves
  it for every caller (it recovers with each success), and one that names its Retry-After is waited out without
  using up a retry, within `throttle_budget_s` per file; so a backfill of many chunks slows down instead of failing.
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
import email.utils
import gzip
import http.client
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

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


class SourceRate:
    """One request rate per source (scheme and host) in this process, shared by its threads: requests start at
    least `1 / requests_per_s` apart. A throttling answer (429, 503) slows the source down for every caller: the
    gap doubles (up to a minute) and nobody starts a request before the pause the answer asked for (its
    Retry-After, else the backoff); each success brings the gap a tenth of the way back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._gap: dict[str, float] = {}

    def wait(self, source: str, gap: float) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next.get(source, 0.0))
            self._next[source] = start + self._gap.get(source, gap)
        if start > now:
            time.sleep(start - now)

    def slow_down(self, source: str, gap: float, pause: float) -> None:
        with self._lock:
            if gap > 0:
                self._gap[source] = min(60.0, 2 * max(self._gap.get(source, gap), gap))
            self._next[source] = max(self._next.get(source, 0.0), time.monotonic() + pause)

    def recovered(self, source: str, gap: float) -> None:
        with self._lock:
            slower = self._gap.get(source)
            if slower is not None:
                back = slower - (slower - gap) / 10
                if back <= gap * 1.01:
                    del self._gap[source]
                else:
                    self._gap[source] = back

    def gap(self, source: str, gap: float) -> float:
        with self._lock:
            return self._gap.get(source, gap)


RATES = SourceRate()
THROTTLES = frozenset({429, 503})


def retry_after_s(value: str | None, cap: float) -> float | None:
    """A Retry-After value (seconds, or an HTTP date) as seconds from now, at most `cap`; None if absent or bad."""
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        try:
            return min(cap, max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time()))
        except (TypeError, ValueError):
            return None


def _source_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def download_http(url: str, dest: str, settings: SourceSettings) -> None:
    """Download with at most `retries + 1` attempts (transient errors only); a dropped connection resumes with a
    Range request, and so does a call finding part of the file at `dest` already (the model files' fetch).

    Requests to one source keep its rate (`requests_per_s`, `RATES`). A 429 or 503 that says when to come back
    (Retry-After, up to `max_retry_after_s`) is waited out without using a retry, while the file's waits stay
    within `throttle_budget_s`: the server asked us to slow down, not to give up. Other transient failures wait
    `backoff_s * 2**n`, jittered by +-50% so that many steps do not come back together."""
    source = _source_of(url)
    gap = 1.0 / settings.requests_per_s if settings.requests_per_s > 0 else 0.0
    attempts = failures = 0
    throttled_s = 0.0
    while True:
        RATES.wait(source, gap)
        attempts += 1
        retry_after = None
        throttle = False
        try:
            _http_attempt(url, dest, settings)
            RATES.recovered(source, gap)
            return
        except urllib.error.HTTPError as err:  # before OSError: HTTPError is one
            if not _is_transient(err):
                raise WatFetchError(f"{url}: HTTP {err.code}") from err
            last: BaseException = err
            throttle = err.code in THROTTLES
            if throttle:
                retry_after = retry_after_s(err.headers.get("Retry-After"), settings.max_retry_after_s)
        except (OSError, http.client.IncompleteRead) as err:
            last = err
        if retry_after is not None and throttled_s + retry_after <= settings.throttle_budget_s:
            throttled_s += retry_after
            RATES.slow_down(source, gap, retry_after)
            continue
        failures += 1
        if failures > settings.retries:
            raise WatFetchError(f"{url}: failed after {attempts} attempts: {last}") from last
        delay = settings.backoff_s * 2 ** (failures - 1) * random.uniform(0.5, 1.5)
        if throttle:
            RATES.slow_down(source, gap, delay)  # every caller of the source waits, not just this one
        else:
            time.sleep(delay)


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
