"""Common Crawl WAT files: where a crawl's files are, how its listing is chunked, and reading records.

A source is a base location holding `crawl-data/<crawl>/wat.paths.gz` and the files it lists: the
`s3://commoncrawl/` bucket, an HTTPS mirror (`https://data.commoncrawl.org/`) or a local directory.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastwarc.warc import ArchiveIterator, WarcRecordType

DEFAULT_SOURCE = "data/sample-mirror"
# One honest identity for every request the project makes (crawl files and images alike).
USER_AGENT = "laion-assets/0.1 (image-text dataset builder; +https://github.com/laion-assets/laion_assets)"


class WatFetchError(RuntimeError):
    """A WAT file (or listing) that could not be read after retries."""


@dataclass(frozen=True)
class SourceSettings:
    """Where crawl files come from and how hard to try reading them."""

    base: str = DEFAULT_SOURCE
    retries: int = 4
    timeout_s: float = 120.0
    backoff_s: float = 1.0


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
    location = join_source(settings.base, f"crawl-data/{crawl}/wat.paths.gz")
    with fetched(location, settings, s3_client) as path, gzip.open(path, "rt") as fh:
        return [line.strip() for line in fh if line.strip()]


def chunk_slices(n_paths: int, n_chunks: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of a listing, as even as possible; deterministic for a listing."""
    if n_chunks < 1:
        raise ValueError("n_chunks must be at least 1")
    return [(i * n_paths // n_chunks, (i + 1) * n_paths // n_chunks) for i in range(n_chunks)]


# --- reading records ------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What happened while reading one file's records."""

    records: int = 0
    bytes: int = 0
    corrupt_members: int = 0  # undecodable stretches skipped by resynchronising on the next record
    truncated: bool = False


_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_MAGIC = b"WARC/1."


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(3) == _GZIP_MAGIC


def _next_marker(fh: io.BufferedReader, start: int, marker: bytes) -> int | None:
    """Offset of the next occurrence of marker at or after start, or None."""
    fh.seek(start)
    carry = b""
    pos = start
    while block := fh.read(1 << 20):
        buf = carry + block
        idx = buf.find(marker)
        if idx >= 0:
            return pos - len(carry) + idx
        carry = buf[-(len(marker) - 1) :]
        pos += len(block)
    return None


def _member_complete(fh: io.BufferedReader, offset: int) -> bool:
    """Whether the gzip member starting at offset ends properly (FastWARC stops silently at a cut one)."""
    fh.seek(offset)
    d = zlib.decompressobj(31)
    while block := fh.read(1 << 16):
        d.decompress(block, 0)
        if d.eof:
            return True
    return d.eof


def _records_in(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(headers, payload) of each WARC record in a decompressed block, CRLF or bare-LF line ends."""
    pos = 0
    while True:
        start = block.find(_WARC_MAGIC, pos)
        if start < 0:
            return
        end = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start)
        if crlf >= 0 and (end < 0 or crlf < end):
            end, sep = crlf, 4
        elif end >= 0:
            sep = 2
        else:
            return
        headers = block[start:end]
        length = 0
        for line in headers.split(b"\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or 0)
        body = end + sep
        yield headers, block[body : body + length]
        pos = body + length


def _lenient_metadata_records(path: str, stats: ReadStats, gz: bool) -> Iterator[tuple[int, bytes]]:
    """A slower reader for files FastWARC rejects (bare-LF headers, hand-edited excerpts)."""
    with open(path, "rb") as fh:
        data = fh.read()
    members: list[tuple[int, bytes]] = []
    if gz:
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            # Inflate in bounded pieces: handing zlib the whole rest of the file for every member would
            # copy it each time (quadratic on a full-size WAT file).
            d = zlib.decompressobj(31)
            parts = []
            feed = pos
            try:
                while not d.eof and feed < len(data):
                    parts.append(d.decompress(view[feed : feed + (1 << 16)]))
                    feed += 1 << 16
            except zlib.error:
                stats.corrupt_members += 1
                nxt = data.find(_GZIP_MAGIC, pos + 1)
                if nxt < 0:
                    break
                pos = nxt
                continue
            if not d.eof:
                stats.truncated = True
                break
            members.append((pos, b"".join(parts)))
            pos = min(feed, len(data)) - len(d.unused_data)
    else:
        members.append((0, data))
    for offset, block in members:
        for headers, payload in _records_in(block):
            if b"WARC-Type: metadata" in headers:
                stats.records += 1
                yield offset, payload


def iter_metadata_records(path: str, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(offset, JSON payload) of every WAT metadata record in a file, gzip members or plain.

    A corrupt gzip member does not end the file: reading resumes at the next record boundary after it,
    and the skipped stretch is counted. A file cut in the middle of its last record is flagged as
    truncated (its last, partial record is still yielded; its JSON will not parse).
    """
    stats.bytes = os.path.getsize(path)
    gz = _is_gzip(path)
    marker = _GZIP_MAGIC if gz else _WARC_MAGIC
    with open(path, "rb") as fh:
        start = 0
        last_pos = -1
        while True:
            fh.seek(start)
            yielded = False
            try:
                for rec in ArchiveIterator(fh, record_types=WarcRecordType.metadata, parse_http=False):
                    last_pos = rec.stream_pos  # absolute: FastWARC counts from the file start
                    yielded = True
                    stats.records += 1
                    yield last_pos, rec.reader.read()
                break
            except OSError:
                if last_pos < 0 and not yielded and start == 0:
                    # FastWARC refuses the very first record: not a corrupt member but a file it cannot
                    # parse (bare-LF headers). Read it the slow, lenient way.
                    yield from _lenient_metadata_records(path, stats, gz)
                    return
                if not yielded:  # the member at `start` itself is bad: it is skipped
                    stats.corrupt_members += 1
                # Past the last good record, or past the boundary that just failed, so each try advances.
                nxt = _next_marker(fh, (last_pos if yielded else start) + 1, marker)
                if nxt is None:
                    break
                start = nxt
        if gz and last_pos >= 0 and not _member_complete(fh, last_pos):
            stats.truncated = True


# --- the manifest ---------------------------------------------------------------------------------


def manifest_key(crawl: str) -> str:
    return f"crawls/{crawl}/wat_manifest.parquet"


def build_manifest(paths: list[str], n_chunks: int, key_of: Any) -> Any:
    """A table (chunk, position, path): position is the path's index in the crawl's listing."""
    import pyarrow as pa

    chunks: list[str] = []
    for chunk, (lo, hi) in enumerate(chunk_slices(len(paths), n_chunks)):
        chunks.extend([key_of(chunk)] * (hi - lo))
    return pa.table(
        {"chunk": chunks, "position": pa.array(range(len(paths)), pa.int64()), "path": paths}
    )
