"""A URL list as a crawl of the graph: `laion-assets lists add NAME LOCATION` records where the list is and which
columns hold what, and the crawl dimension gets a partition `list-NAME`. Its `wat_manifest` lists the list's
files, and its `candidate_pairs` read them (any format `download/inputs.py` reads) into the same URL buckets the
WAT extraction writes, so that dedup, download, the CLIP pass, release, statistics, removals and the indices run
on it unchanged.

A pair of a list has the list's caption as its text (cleaned as alt texts are, never dropped for being short: the
list decided what is in it), the list's language when it has a column for one and CLD3's otherwise, the list
file in `wat_file` and the row's position in `record_offset`, and in `record_id` the list's id column when one
is named (DataComp's `uid`). A list's files are split over chunks in order, a whole file per chunk: a list of
one file is read by one chunk and the others are empty.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import gcld3
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.core import paths
from laion_assets.core.crawl.candidates import SCHEMA, clean_text
from laion_assets.core.crawl.extract import ChunkTarget, ExtractReport
from laion_assets.core.crawl.manifest import build_manifest
from laion_assets.core.download.inputs import InputSpec, ReadCounts, check_format, format_of, list_inputs, read_file
from laion_assets.core.paths import Layout
from laion_assets.core.records import JsonRecord
from laion_assets.core.settings import ExtractSettings
from laion_assets.core.storage import Storage

PREFIX = "list-"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def crawl_of(name: str) -> str:
    """The crawl key of a list: list-NAME."""
    return PREFIX + name


def is_list(crawl: str) -> bool:
    return crawl.startswith(PREFIX)


def name_of(crawl: str) -> str:
    return crawl[len(PREFIX):]


@dataclass
class UrlList(JsonRecord):
    """Where a registered list is and how to read it."""

    name: str
    location: str
    input_format: str = ""  # empty: from the file names
    url_col: str = "url"
    caption_col: str = "caption"
    language_col: str = "language"
    id_col: str = ""  # copied to the pairs' record_id (e.g. DataComp's uid)

    def spec(self) -> InputSpec:
        return InputSpec(self.location, self.input_format, self.url_col, self.caption_col, self.language_col,
                         (self.id_col,) if self.id_col else ())

    def committed_at(self) -> str:
        return paths.url_list(self.name)


def compared_crawls(crawl: str, registered: list[str], lists_against_crawls: bool) -> list[str]:
    """The crawls a crawl's URLs and images are deduplicated against: the crawls before it. A URL list is compared
    with nothing (it re-downloads what it lists), unless asked: then with every crawl and earlier list; a crawl is
    never compared with lists."""
    if is_list(crawl) and not lists_against_crawls:
        return []
    return sorted(c for c in registered if c < crawl and (not is_list(c) or is_list(crawl)))


def register(store: Storage, url_list: UrlList) -> str:
    """Check the list can be read (its files, their format, the columns named) and record it; its crawl key."""
    if not NAME.fullmatch(url_list.name):
        raise ValueError(f"list name {url_list.name!r}: lowercase letters, digits, '.', '_' and '-' only")
    if url_list.input_format:
        check_format(url_list.input_format)
    files = list_inputs(url_list.location, url_list.input_format)
    spec = url_list.spec()
    first = read_file(files[0], url_list.input_format or format_of(files[0]) or "", spec, ReadCounts())
    next(first, None)  # the first batch: a missing column fails here, before anything is registered
    first.close()
    store.write_bytes(paths.url_list(url_list.name), url_list.to_json())
    return crawl_of(url_list.name)


def read_record(store: Storage, crawl: str) -> UrlList:
    key = paths.url_list(name_of(crawl))
    if not store.exists(key):
        raise FileNotFoundError(f"{crawl} is registered as a URL list but {store.uri(key)} is missing: "
                                "register it with `laion-assets lists add`")
    return UrlList.from_json(store.read_bytes(key))


def manifest(store: Storage, crawl: str, layout: Layout) -> pa.Table:
    """The list's wat_manifest: its files, split over the chunks as a crawl's WAT files are."""
    record = read_record(store, crawl)
    return build_manifest(list_inputs(record.location, record.input_format), layout)


class _Pairs:
    """A list's rows as pairs: cleaned caption, the list's language or CLD3's."""

    def __init__(self, crawl: str, settings: ExtractSettings) -> None:
        self.crawl, self.settings = crawl, settings
        self.detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def table(self, batch: pa.RecordBatch, record: UrlList, path: str, first_row: int, report: ExtractReport,
              ) -> pa.Table:
        urls = batch.column(0).to_pylist()
        captions = batch.column(1).to_pylist()
        languages = batch.column(2).to_pylist()
        ids = batch.column(3).cast(pa.string()).to_pylist() if record.id_col else [None] * batch.num_rows
        texts, langs, scores = [], [], []
        for caption, language in zip(captions, languages, strict=True):
            text, truncated = clean_text(caption or "", self.settings.max_text_length)
            report.counts.truncated_text += truncated
            if language:
                langs.append(language)
                scores.append(1.0)
            elif text:
                res = self.detector.FindLanguage(text)
                langs.append(res.language if res.is_reliable else "")
                scores.append(float(res.probability))
            else:
                langs.append("")
                scores.append(0.0)
            texts.append(text)
        counts = report.counts
        counts.pairs += len(urls)
        counts.english += sum(lang == "en" for lang in langs)
        counts.nolang += sum(lang == "" for lang in langs)
        counts.other_language += sum(lang not in ("", "en") for lang in langs)
        n = len(urls)
        return pa.table({
            "url": pa.array(urls, pa.string()), "text": pa.array(texts, pa.string()),
            "language": pa.array(langs, pa.string()), "language_score": pa.array(scores, pa.float32()),
            "page_url": pa.nulls(n, pa.string()), "robots": pa.nulls(n, pa.string()),
            "crawl": pa.array([self.crawl] * n, pa.string()), "wat_file": pa.array([path] * n, pa.string()),
            "record_offset": pa.array(range(first_row, first_row + n), pa.int64()),
            "record_id": pa.array(ids, pa.string()), "link_index": pa.array([0] * n, pa.int32()),
        }, schema=SCHEMA)


def run(store: Storage, crawl: str, files: list[str], target: ChunkTarget,
        settings: ExtractSettings | None = None) -> ExtractReport:
    """A list chunk's entry point (the candidate_pairs asset of a list crawl): its files' rows into the chunk's URL
    buckets; malformed lines are counted (corrupt_records), rows without a URL are kept out and counted
    (dropped_invalid_url), every other row is a pair."""
    start = time.perf_counter()
    record = read_record(store, crawl)
    pairs = _Pairs(crawl, settings or ExtractSettings())
    report = ExtractReport()
    with target:
        for path in files:
            counts = ReadCounts()
            row = 0
            fmt = record.input_format or format_of(path) or ""
            for batch in read_file(path, fmt, record.spec(), counts):
                valid = pc.is_valid(batch.column(0))
                kept = batch.filter(valid)
                report.counts.dropped_invalid_url += batch.num_rows - kept.num_rows
                table = pairs.table(kept, record, path, row, report)
                row += batch.num_rows
                target.write(table)
                if len(report.preview) < 10:
                    report.preview += table.slice(0, 10 - len(report.preview)).to_pylist()
            report.counts.files += 1
            report.counts.records += row
            report.counts.corrupt_records += counts.malformed
        report.output = target.commit(report, files)
    report.seconds = time.perf_counter() - start
    return report
