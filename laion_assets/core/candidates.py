"""Candidate (image URL, alt text) pairs from WAT records, with language, by LAION-5B's rules.

Rules, in the order they apply to each `IMG@/src` link of a `response` record's HTML metadata:
1. an alt text must be present;
2. the URL is resolved against the page URL and `Head.Base` (relative and protocol-relative URLs are
   kept, unlike LAION-5B's first pass); only http(s) survives (`data:`, `javascript:`, `mailto:`, ... are
   dropped), and so do not `.svg` / `.gif` images;
3. the URL is normalized (fragment dropped, scheme and host lower-cased, default port removed) so that
   exact dedup later compares like with like;
4. the alt text is repaired (ftfy), stripped of unprintable characters and U+FFFD, whitespace-collapsed,
   truncated when absurdly long, and dropped when shorter than 5 characters;
5. CLD3 names its language: a code when reliable, `""` (nolang) otherwise, with the probability.
Every drop is counted by rule; nothing is dropped silently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urljoin

import ftfy
import gcld3
import orjson
import pyarrow as pa

from laion_assets.core.buckets import CHUNK_MARKER, BucketWriter, candidates_chunk_prefix, write_chunk_marker
from laion_assets.core.settings import ExtractSettings
from laion_assets.core.storage import Storage
from laion_assets.core.wat import (
    ReadStats,
    SourceSettings,
    WatFetchError,
    fetched,
    iter_metadata_records,
    join_source,
)

SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("text", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("page_url", pa.string()),
        ("robots", pa.string()),
        ("crawl", pa.string()),
        ("wat_file", pa.string()),
        ("record_offset", pa.int64()),
        ("record_id", pa.string()),
        ("link_index", pa.int32()),
    ]
)
COLUMNS = SCHEMA.names


# Drop reasons returned by clean_url instead of a URL.
BAD_SCHEME, BAD_EXTENSION, BAD_URL = 0, 1, 2
_DROP_NAMES = ("dropped_scheme", "dropped_extension", "dropped_invalid_url")


def first(value: Any) -> Any:
    """A header value: since CC-MAIN-2024-51 repeated headers are JSON lists instead of strings."""
    if type(value) is list:
        return value[0] if value else None
    return value


def joined(value: Any) -> str:
    """All values of a possibly repeated header, comma-joined as HTTP would fold them."""
    if value is None:
        return ""
    if type(value) is list:
        return ", ".join(str(v) for v in value)
    return str(value)


def normalize_url(url: str, drop_extensions: tuple[str, ...] = ExtractSettings.drop_extensions) -> str | int:
    """Canonical form of an absolute http(s) URL, or a drop reason.

    Done with string operations rather than urlsplit: this runs on every kept link of a crawl.
    """
    url = url.partition("#")[0]
    if not url.isprintable() or " " in url:
        # Browsers drop tabs and newlines inside URLs and percent-encode spaces.
        url = "".join(c for c in url if c.isprintable()).replace(" ", "%20")
    scheme, sep, rest = url.partition("://")
    if not sep:  # "mailto:x" has a scheme of its own; anything else is not a URL
        return BAD_SCHEME if ":" in url.partition("/")[0] else BAD_URL
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        return BAD_SCHEME
    end = len(rest)
    for ch in "/?":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not host or host.startswith(":") or "\\" in host or host.startswith("[") and "]" not in host:
        return BAD_URL
    if not host.islower():
        host = host.lower()
    if host.endswith(":80") and scheme == "http" or host.endswith(":443") and scheme == "https":
        host = host.rpartition(":")[0]
    if not tail:
        tail = "/"
    elif tail[0] == "?":
        tail = "/" + tail
    path = tail.partition("?")[0].lower()
    if path.endswith(drop_extensions):
        return BAD_EXTENSION
    return f"{scheme}://{userinfo}{at}{host}{tail}"


def resolve_url(
    raw: str, base: str, base_scheme: str, drop_extensions: tuple[str, ...] = ExtractSettings.drop_extensions
) -> str | int:
    """An `IMG@/src` value made absolute against the page's base URL and normalized, or a drop reason."""
    raw = raw.strip()
    if not raw:
        return BAD_URL
    head = raw[:11].lower()
    if head.startswith(("http://", "https://")):
        absolute = raw
    elif head.startswith(("data:", "javascript:")):
        return BAD_SCHEME
    elif raw.startswith("//"):
        absolute = base_scheme + ":" + raw
    else:
        try:
            absolute = urljoin(base, raw)
        except ValueError:  # e.g. an invalid IPv6 literal
            return BAD_URL
    return normalize_url(absolute, drop_extensions)


def clean_text(raw: str, max_length: int) -> tuple[str, bool]:
    """Repaired, printable, whitespace-collapsed alt text, and whether it was truncated."""
    text = raw
    if not text.isascii() or "&" in text:
        # ftfy repairs mojibake and HTML entities; pure ASCII without '&' has neither, and ftfy is slow.
        text = ftfy.fix_text(text)
    if "\ufffd" in text:  # an undecodable byte carries no information
        text = text.replace("\ufffd", " ")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    if len(text) > max_length:
        return text[:max_length].rstrip(), True
    return text, False


@dataclass
class ExtractCounts:
    """Counters of one extraction, each rule's drops separately."""

    files: int = 0
    files_failed: int = 0
    files_truncated: int = 0
    corrupt_members: int = 0
    bytes: int = 0
    records: int = 0
    response_records: int = 0
    records_parsed: int = 0
    corrupt_records: int = 0
    links: int = 0
    img_links: int = 0
    dropped_no_alt: int = 0
    dropped_scheme: int = 0
    dropped_extension: int = 0
    dropped_invalid_url: int = 0
    dropped_short_text: int = 0
    truncated_text: int = 0
    pairs: int = 0
    english: int = 0
    other_language: int = 0
    nolang: int = 0

    def add(self, other: ExtractCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class ExtractReport:
    counts: ExtractCounts = field(default_factory=ExtractCounts)
    failed_files: list[tuple[str, str]] = field(default_factory=list)
    truncated_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    preview: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self.counts)
        data["seconds"] = round(self.seconds, 3)
        data["records_per_second"] = round(self.counts.records / self.seconds, 1) if self.seconds else 0.0
        data["failed_files"] = [f"{name}: {err}" for name, err in self.failed_files]
        data["truncated_files"] = list(self.truncated_files)
        return data

    def summary(self) -> str:
        c = self.counts
        return (
            f"{c.files} WAT files ({c.files_failed} failed), {c.records} records, {c.img_links} image links"
            f" -> {c.pairs} pairs (en {c.english}, other {c.other_language}, nolang {c.nolang});"
            f" dropped: no alt {c.dropped_no_alt}, scheme {c.dropped_scheme}, extension"
            f" {c.dropped_extension}, invalid url {c.dropped_invalid_url}, short text {c.dropped_short_text};"
            f" corrupt records {c.corrupt_records}; {self.seconds:.2f} s"
        )


class PairExtractor:
    """Turns WAT files into pair tables; holds the language model and the per-process text cache."""

    def __init__(self, settings: ExtractSettings | None = None) -> None:
        self.settings = settings or ExtractSettings()
        self._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        self._cache: dict[str, tuple[str, str, float, bool] | None] = {}

    def _text(self, raw: str) -> tuple[str, str, float, bool] | None:
        """(text, language, probability, truncated) for a raw alt text, or None when too short."""
        hit = self._cache.get(raw, False)
        if hit is not False:
            return hit
        text, truncated = clean_text(raw, self.settings.max_text_length)
        entry: tuple[str, str, float, bool] | None = None
        if len(text) >= self.settings.min_text_length:
            res = self._detector.FindLanguage(text)
            entry = (text, res.language if res.is_reliable else "", float(res.probability), truncated)
        if len(self._cache) >= self.settings.text_cache_size:
            self._cache.clear()
        self._cache[raw] = entry
        return entry

    def extract_file(self, path: str, wat_file: str, crawl: str, counts: ExtractCounts) -> pa.Table:
        """All pairs of one local WAT file (gzip members or plain), counting what each rule dropped."""
        cols: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        url_col, text_col, lang_col, score_col = (cols[c] for c in ("url", "text", "language", "language_score"))
        page_col, robots_col, off_col, id_col = (cols[c] for c in ("page_url", "robots", "record_offset", "record_id"))
        idx_col = cols["link_index"]
        drops = [0, 0, 0]
        exts = self.settings.drop_extensions
        text_of = self._text
        stats = ReadStats()
        for offset, payload in iter_metadata_records(path, stats):
            if b'"WARC-Type":"response"' in payload:
                counts.response_records += 1
            # Only response records carry links; most records have no image at all: skip their JSON.
            if b"IMG@/src" not in payload:
                continue
            counts.records_parsed += 1
            try:
                envelope = orjson.loads(payload)["Envelope"]
                warc = envelope["WARC-Header-Metadata"]
                if first(warc.get("WARC-Type")) != "response":
                    continue
                http = envelope["Payload-Metadata"]["HTTP-Response-Metadata"]
                html = http.get("HTML-Metadata") or {}
                links = html.get("Links") or ()
                page_url = first(warc["WARC-Target-URI"])
                record_id = first(warc.get("WARC-Record-ID")) or ""
                base = page_url
                head = html.get("Head")
                if head and head.get("Base"):
                    try:
                        base = urljoin(page_url, first(head["Base"]))
                    except ValueError:
                        pass
                robots = ""
                if b"obots-" in payload or b"OBOTS-" in payload:
                    for name, value in (http.get("Headers") or {}).items():
                        if name.lower() == "x-robots-tag":
                            robots = joined(value).lower()
                base_scheme = base.partition(":")[0].lower()
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                counts.corrupt_records += 1
                continue
            counts.links += len(links)
            img = 0
            no_alt = 0
            short = 0
            truncated = 0
            for i, link in enumerate(links):
                try:
                    if link.get("path") != "IMG@/src":
                        continue
                except AttributeError:  # not an object: a malformed link
                    continue
                img += 1
                alt = link.get("alt")
                if not alt:
                    no_alt += 1
                    continue
                if type(alt) is not str:
                    alt = joined(alt)
                raw_url = link.get("url")
                if type(raw_url) is not str:
                    drops[BAD_URL] += 1
                    continue
                url = resolve_url(raw_url, base, base_scheme, exts)
                if type(url) is int:
                    drops[url] += 1
                    continue
                entry = text_of(alt)
                if entry is None:
                    short += 1
                    continue
                url_col.append(url)
                text_col.append(entry[0])
                lang_col.append(entry[1])
                score_col.append(entry[2])
                truncated += entry[3]
                page_col.append(page_url)
                robots_col.append(robots)
                off_col.append(offset)
                id_col.append(record_id)
                idx_col.append(i)
            counts.img_links += img
            counts.dropped_no_alt += no_alt
            counts.dropped_short_text += short
            counts.truncated_text += truncated
        n = len(url_col)
        cols["crawl"] = [crawl] * n
        cols["wat_file"] = [wat_file] * n
        for name, value in zip(_DROP_NAMES, drops, strict=True):
            setattr(counts, name, getattr(counts, name) + value)
        counts.files += 1
        counts.records += stats.records
        counts.bytes += stats.bytes
        counts.corrupt_members += stats.corrupt_members
        counts.files_truncated += stats.truncated
        counts.pairs += n
        english = lang_col.count("en")
        nolang = lang_col.count("")
        counts.english += english
        counts.nolang += nolang
        counts.other_language += n - english - nolang
        return pa.Table.from_pydict(cols, schema=SCHEMA)


def extract_locations(
    locations: Iterable[tuple[str, str]],
    crawl: str,
    on_table: Callable[[pa.Table], None],
    settings: ExtractSettings | None = None,
    source: SourceSettings | None = None,
    s3_client: Any = None,
    progress: Callable[[int, str], None] | None = None,
) -> ExtractReport:
    """Extract pairs from (location, name) WAT files, handing each file's table to on_table.

    A file that cannot be fetched after retries is recorded in the report and the others go on.
    """
    source = source or SourceSettings()
    extractor = PairExtractor(settings)
    report = ExtractReport()
    start = time.perf_counter()
    for n, (location, name) in enumerate(locations):
        file_counts = ExtractCounts()
        try:
            with fetched(location, source, s3_client) as path:
                table = extractor.extract_file(path, name, crawl, file_counts)
        except (WatFetchError, OSError) as err:
            report.counts.files_failed += 1
            report.failed_files.append((name, str(err)))
            continue
        report.counts.add(file_counts)
        if file_counts.files_truncated:
            report.truncated_files.append(name)
        if len(report.preview) < 10 and table.num_rows:
            report.preview.extend(table.slice(0, 10 - len(report.preview)).to_pylist())
        on_table(table)
        if progress:
            progress(n + 1, name)
    report.seconds = time.perf_counter() - start
    return report


def extract_chunk(
    storage: Storage,
    crawl: str,
    chunk: str,
    wat_paths: list[str],
    n_buckets: int,
    settings: ExtractSettings | None = None,
    source: SourceSettings | None = None,
    s3_client: Any = None,
    progress: Callable[[int, str], None] | None = None,
) -> ExtractReport:
    """One chunk of the parse stage: its WAT files' pairs, split by URL bucket into storage.

    The bucket files are committed first and the chunk's marker last, so a killed run leaves nothing
    that `unique_pairs` would trust and a rerun redoes the chunk whole.
    """
    source = source or SourceSettings()
    prefix = candidates_chunk_prefix(crawl, chunk, n_buckets)
    storage.delete(f"{prefix}/{CHUNK_MARKER}")
    with storage.staging_dir() as stage:
        writer = BucketWriter(stage, n_buckets, SCHEMA)
        report = extract_locations(
            ((join_source(source.base, p), p) for p in wat_paths),
            crawl,
            writer.write,
            settings,
            source,
            s3_client,
            progress,
        )
        for path in writer.close():
            storage.put_file(path, f"{prefix}/{os.path.basename(path)}")
    write_chunk_marker(storage, prefix, {"crawl": crawl, "chunk": chunk, "wat_files": wat_paths,
                                         **report.metadata()})
    return report
