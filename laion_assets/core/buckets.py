"""URL-hash buckets: the shuffle between the parse stage (crawl x chunk) and everything after dedup
(crawl x bucket), and the exact dedup of one bucket.

A pair's bucket is `xxh3_64(url) % n_buckets` on the normalized URL: stable across processes, machines
and library versions (unlike Python's `hash` or a dataframe library's internal hash), so a bucket of one
crawl can be compared with the same bucket of an earlier crawl.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from laion_assets.core.storage import Storage

if TYPE_CHECKING:
    import polars as pl

CHUNK_MARKER = "_report.json"
# The first occurrence in crawl order represents a URL: the same whatever order the chunks ran in.
ORDER = ["url", "wat_file", "record_offset", "link_index"]


def bucket_of(urls: list[str], n_buckets: int) -> np.ndarray:
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(u.encode()) for u in urls), dtype=np.uint64, count=len(urls))
    return (hashes % np.uint64(n_buckets)).astype(np.int64)


def key_width(n: int) -> int:
    return max(4, len(str(n - 1)))


def chunk_key(chunk: int, n_chunks: int) -> str:
    return str(chunk).zfill(key_width(n_chunks))


def bucket_key(bucket: int, n_buckets: int) -> str:
    return str(bucket).zfill(key_width(n_buckets))


def candidates_prefix(crawl: str, n_buckets: int) -> str:
    # The bucket count is part of the path: files split another way can never be mixed up.
    return f"crawls/{crawl}/candidates/buckets={n_buckets}"


def candidates_chunk_prefix(crawl: str, chunk: str, n_buckets: int) -> str:
    return f"{candidates_prefix(crawl, n_buckets)}/chunk={chunk}"


def unique_pairs_key(crawl: str, bucket: str, n_buckets: int) -> str:
    return f"crawls/{crawl}/unique_pairs/buckets={n_buckets}/bucket={bucket}.parquet"


class BucketWriter:
    """Splits tables by URL bucket into one Parquet file per bucket (all buckets, empty ones too)."""

    def __init__(self, directory: str, n_buckets: int, schema: pa.Schema) -> None:
        self.directory = directory
        self.n_buckets = n_buckets
        self.schema = schema
        self._writers: dict[int, pq.ParquetWriter] = {}
        self.rows = [0] * n_buckets

    def path(self, bucket: int) -> str:
        return os.path.join(self.directory, f"bucket={bucket_key(bucket, self.n_buckets)}.parquet")

    def _writer(self, bucket: int) -> pq.ParquetWriter:
        w = self._writers.get(bucket)
        if w is None:
            w = self._writers[bucket] = pq.ParquetWriter(self.path(bucket), self.schema, compression="zstd")
        return w

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        buckets = bucket_of(table.column("url").to_pylist(), self.n_buckets)
        order = np.argsort(buckets, kind="stable")
        table = table.take(pa.array(order))
        counts = np.bincount(buckets, minlength=self.n_buckets)
        start = 0
        for b in np.flatnonzero(counts):
            n = int(counts[b])
            self._writer(int(b)).write_table(table.slice(start, n))
            self.rows[b] += n
            start += n

    def close(self) -> list[str]:
        for b in range(self.n_buckets):
            self._writer(b)
        for w in self._writers.values():
            w.close()
        return [self.path(b) for b in range(self.n_buckets)]


def write_chunk_marker(storage: Storage, prefix: str, report: dict[str, Any]) -> None:
    storage.write_bytes(f"{prefix}/{CHUNK_MARKER}", json.dumps(report, indent=1, default=str).encode())


def complete_chunks(storage: Storage, crawl: str, n_buckets: int) -> set[str]:
    """Chunk keys whose marker exists: their bucket files are all there."""
    done = set()
    for key in storage.list(candidates_prefix(crawl, n_buckets)):
        if key.endswith("/" + CHUNK_MARKER):
            done.add(key.rsplit("/", 2)[-2].partition("=")[2])
    return done


@dataclass
class DedupReport:
    rows_in: int = 0
    unique_in_crawl: int = 0
    seen_in_earlier_crawls: int = 0
    rows_out: int = 0
    chunks: int = 0
    earlier_crawls: list[str] = field(default_factory=list)
    bytes_out: int = 0
    seconds: float = 0.0
    preview: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("preview")
        data["seconds"] = round(self.seconds, 3)
        data["duplicates_removed"] = self.rows_in - self.unique_in_crawl
        return data


def unique_by_url(pairs: pl.LazyFrame) -> pl.LazyFrame:
    """One row per URL (its first occurrence in crawl order) with the number of occurrences, sorted by URL."""
    import polars as pl

    return (
        pairs.sort(ORDER)
        .group_by("url", maintain_order=True)
        .agg(pl.all().first(), pl.len().cast(pl.Int32).alias("occurrences"))
    )


class IncompleteChunksError(RuntimeError):
    pass


def dedup_bucket(
    storage: Storage, crawl: str, bucket: str, chunks: list[str], n_buckets: int, earlier_crawls: list[str]
) -> DedupReport:
    """Exact dedup of one bucket on the normalized URL, across all chunks of the crawl and against the
    same bucket of earlier crawls; writes `unique_pairs` with an `occurrences` count per URL.

    The output is sorted by URL and each URL keeps its first occurrence in (wat_file, offset, link)
    order, so it does not depend on the order in which chunks ran.
    """
    import polars as pl  # imported here: the parse stage's hot path does not need it

    start = time.perf_counter()
    done = complete_chunks(storage, crawl, n_buckets)
    missing = sorted(set(chunks) - done)
    if missing:
        raise IncompleteChunksError(
            f"{crawl}: candidate_pairs of {len(missing)} chunk(s) not complete yet: {', '.join(missing[:10])}"
        )
    report = DedupReport(chunks=len(chunks))
    keys = [f"{candidates_chunk_prefix(crawl, c, n_buckets)}/bucket={bucket}.parquet" for c in sorted(chunks)]
    earlier_keys = []
    for other in sorted(earlier_crawls):
        key = unique_pairs_key(other, bucket, n_buckets)
        if storage.exists(key):
            earlier_keys.append(key)
            report.earlier_crawls.append(other)
    out_key = unique_pairs_key(crawl, bucket, n_buckets)
    with storage.local_copies(keys + earlier_keys) as paths, storage.staging_dir() as stage:
        pairs = pl.scan_parquet(paths[: len(keys)])
        report.rows_in = pairs.select(pl.len()).collect().item()
        unique = unique_by_url(pairs)
        if earlier_keys:
            seen = pl.scan_parquet(paths[len(keys) :]).select("url")
            result = unique.join(seen, on="url", how="anti")
        else:
            result = unique
        local = os.path.join(stage, "unique.parquet")
        result.sink_parquet(local, compression="zstd")
        report.unique_in_crawl = pairs.select(pl.col("url").n_unique()).collect(engine="streaming").item()
        report.rows_out = pq.ParquetFile(local).metadata.num_rows
        report.seen_in_earlier_crawls = report.unique_in_crawl - report.rows_out
        report.bytes_out = os.path.getsize(local)
        report.preview = pl.scan_parquet(local).head(10).collect().to_dicts()
        storage.put_file(local, out_key)
    report.seconds = time.perf_counter() - start
    return report
