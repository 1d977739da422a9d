"""The parse stage: WAT files -> candidate pair tables, every drop counted by rule (see `candidates`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urljoin

import gcld3
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.crawl.buckets import BucketWriter
from laion_assets.core.crawl.candidates import (
    COLUMNS,
    SCHEMA,
    Drop,
    clean_text,
    first,
    joined,
    resolve_url,
    robots_directives,
)
from laion_assets.core.crawl.source import WatFetchError, fetched, join_source
from laion_assets.core.crawl.wat import ReadStats, iter_metadata_records
from laion_assets.core.paths import Layout
from laion_assets.core.records import JsonRecord
from laion_assets.core.settings import ExtractSettings, SourceSettings
from laion_assets.core.storage import Storage, atomic_path


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
    output: Any = None  # what the target committed: a ChunkOutput, or the Parquet file's path

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


@dataclass
class Page:
    """What the link loop needs of one response record."""

    url: str
    record_id: str
    base: str  # the page URL, or its Head.Base resolved against it
    base_scheme: str
    robots: str  # the X-Robots-Tag header and robots meta tags (candidates.robots_directives; "" when neither)
    links: list[Any]


class CorruptRecord(ValueError):
    """A record whose JSON does not parse or lacks the envelope's required parts."""


def parse_page(payload: bytes, meta_names: frozenset[str] = frozenset(ExtractSettings.robots_meta_names)
               ) -> Page | None:
    """The page of a WAT metadata record when it describes a response, else None; CorruptRecord if unreadable."""
    try:
        envelope = orjson.loads(payload)["Envelope"]
        warc = envelope["WARC-Header-Metadata"]
        if first(warc.get("WARC-Type")) != "response":
            return None
        http = envelope["Payload-Metadata"]["HTTP-Response-Metadata"]
        html = http.get("HTML-Metadata") or {}
        page_url = first(warc["WARC-Target-URI"])
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
        if head and head.get("Metas"):
            robots = robots_directives(robots, head["Metas"], meta_names)
        return Page(page_url, first(warc.get("WARC-Record-ID")) or "", base, base.partition(":")[0].lower(), robots,
                    html.get("Links") or [])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CorruptRecord(str(err)) from err


class _Columns:
    """The output columns of one file, appended to row by row."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in COLUMNS}

    def table(self, crawl: str, wat_file: str) -> pa.Table:
        n = len(self.cols["url"])
        self.cols["crawl"] = [crawl] * n
        self.cols["wat_file"] = [wat_file] * n
        return pa.Table.from_pydict(self.cols, schema=SCHEMA)


class PairExtractor:
    """Turns WAT files into pair tables; holds the language model and the per-process text cache."""

    def __init__(self, settings: ExtractSettings | None = None) -> None:
        self.settings = settings or ExtractSettings()
        self._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        self._cache: dict[str, tuple[str, str, float, bool] | None] = {}
        self._meta_names = frozenset(n.lower() for n in self.settings.robots_meta_names)

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
        out = _Columns()
        stats = ReadStats()
        for offset, payload in iter_metadata_records(path, stats):
            if b'"WARC-Type":"response"' in payload:
                counts.response_records += 1
            # Only response records carry links; most records have no image at all: skip their JSON.
            if b"IMG@/src" not in payload:
                continue
            counts.records_parsed += 1
            try:
                page = parse_page(payload, self._meta_names)
            except CorruptRecord:
                counts.corrupt_records += 1
                continue
            if page is not None:
                self._add_links(page, offset, out.cols, counts)
        table = out.table(crawl, wat_file)
        _count_file(counts, stats, table)
        return table

    def _add_links(self, page: Page, offset: int, cols: dict[str, list[Any]], counts: ExtractCounts) -> None:
        """The pairs of one page's `IMG@/src` links, appended to cols; each drop counted by rule.

        The hot loop of the stage: columns and counters are locals, and a link costs no call beyond the
        URL and text rules."""
        url_col, text_col, lang_col, score_col = (cols[c] for c in ("url", "text", "language", "language_score"))
        page_col, robots_col, off_col, id_col = (cols[c] for c in ("page_url", "robots", "record_offset", "record_id"))
        idx_col = cols["link_index"]
        exts = self.settings.drop_extensions
        text_of = self._text
        base, base_scheme = page.base, page.base_scheme
        img = no_alt = short = truncated = 0
        drops: dict[Drop, int] = {}
        for i, link in enumerate(page.links):
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
            url = resolve_url(raw_url, base, base_scheme, exts) if type(raw_url) is str else Drop.INVALID_URL
            if type(url) is not str:
                drops[url] = drops.get(url, 0) + 1
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
            page_col.append(page.url)
            robots_col.append(page.robots)
            off_col.append(offset)
            id_col.append(page.record_id)
            idx_col.append(i)
        counts.links += len(page.links)
        counts.img_links += img
        counts.dropped_no_alt += no_alt
        counts.dropped_short_text += short
        counts.truncated_text += truncated
        for reason, n in drops.items():
            setattr(counts, reason.value, getattr(counts, reason.value) + n)


def _count_file(counts: ExtractCounts, stats: ReadStats, table: pa.Table) -> None:
    languages = table["language"].to_pylist()
    english, nolang = languages.count("en"), languages.count("")
    counts.files += 1
    counts.records += stats.records
    counts.bytes += stats.bytes
    counts.corrupt_members += stats.corrupt_members
    counts.files_truncated += stats.truncated
    counts.pairs += table.num_rows
    counts.english += english
    counts.nolang += nolang
    counts.other_language += table.num_rows - english - nolang


def _extract(locations: Iterable[tuple[str, str]], crawl: str, on_table: Callable[[pa.Table], None],
             settings: ExtractSettings | None, source: SourceSettings, s3_client: Any,
             progress: Callable[[int, str], None] | None) -> ExtractReport:
    """Every file's pairs to on_table; a file that cannot be fetched after retries is recorded and the others go on."""
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


@dataclass
class ChunkOutput(JsonRecord):
    """What one chunk of the parse stage wrote: its bucket files (bucket key -> storage key) and their rows, its WAT
    files and counts. Committed as the chunk's marker, last: the chunk is complete when it exists."""

    crawl: str
    chunk: str
    files: dict[str, str]
    rows: dict[str, int]
    wat_files: list[str]
    report: dict[str, Any]
    marker: str = ""

    def committed_at(self) -> str | None:
        return self.marker or None


class ChunkTarget:
    """A chunk of the parse stage: its pairs split by URL bucket into storage, the bucket files committed first and
    the chunk's marker last, so that a killed run leaves nothing `unique_pairs` would trust and a rerun redoes the
    chunk whole."""

    def __init__(self, storage: Storage, crawl: str, chunk: str, layout: Layout) -> None:
        self.storage, self.crawl, self.chunk, self.layout = storage, crawl, chunk, layout
        self.marker = paths.candidates_marker(crawl, chunk, layout)

    def __enter__(self) -> ChunkTarget:
        self.storage.delete(self.marker)
        self._stage = self.storage.staging_dir()
        self.writer = BucketWriter(self._stage.__enter__(), self.layout, SCHEMA)
        return self

    def write(self, table: pa.Table) -> None:
        self.writer.write(table)

    def commit(self, report: ExtractReport, wat_files: list[str]) -> ChunkOutput:
        files = {b: paths.candidates_file(self.crawl, self.chunk, b, self.layout) for b in self.layout.bucket_keys()}
        for bucket, local in self.writer.close().items():
            self.storage.put_file(local, files[bucket])
        rows = {self.layout.bucket_key(b): n for b, n in enumerate(self.writer.rows)}
        output = ChunkOutput(self.crawl, self.chunk, files, rows, wat_files, report.metadata(), self.marker)
        self.storage.write_bytes(self.marker, output.to_json())
        return output

    def __exit__(self, *exc: object) -> None:
        self._stage.__exit__(*exc)


class FileTarget:
    """All pairs in one Parquet file (the `extract` command), in place only once complete."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> FileTarget:
        self._file = atomic_path(self.path)
        self.writer = pq.ParquetWriter(self._file.__enter__(), SCHEMA, compression="zstd")
        return self

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self, report: ExtractReport, wat_files: list[str]) -> str:
        self.writer.close()
        return self.path

    def __exit__(self, *exc: Any) -> None:
        self.writer.close()
        self._file.__exit__(*exc)  # renamed into place only when nothing raised


def run(locations: Iterable[tuple[str, str]], crawl: str, target: ChunkTarget | FileTarget | Callable[[pa.Table], None],
        settings: ExtractSettings | None = None, source: SourceSettings | None = None, s3_client: Any = None,
        progress: Callable[[int, str], None] | None = None) -> ExtractReport:
    """The parse stage's entry point: pairs of the (location, name) WAT files into the target (a chunk's bucket
    files, one Parquet file, or any callable taking each file's table), every drop counted by rule. A file that
    cannot be fetched after retries is recorded in the report and the others go on; what the target committed is
    the report's `output`."""
    source = source or SourceSettings()
    locations = list(locations)
    if callable(target):
        return _extract(locations, crawl, target, settings, source, s3_client, progress)
    with target:
        report = _extract(locations, crawl, target.write, settings, source, s3_client, progress)
        report.output = target.commit(report, [name for _, name in locations])
    return report


def chunk_locations(wat_paths: list[str], source: SourceSettings) -> list[tuple[str, str]]:
    """(location, name) of a chunk's WAT files: the listing's paths are relative to the source."""
    return [(join_source(source.base, p), p) for p in wat_paths]
