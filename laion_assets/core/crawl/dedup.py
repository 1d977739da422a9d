"""Exact dedup of one URL bucket: within the crawl (every chunk's share of the bucket) and against the same
bucket of earlier crawls. Deterministic whatever order the chunks ran in."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.crawl.buckets import complete_chunks
from laion_assets.core.paths import Layout
from laion_assets.core.storage import Storage

if TYPE_CHECKING:
    import polars as pl

# The first occurrence in crawl order represents a URL: the same whatever order the chunks ran in.
ORDER = ["url", "wat_file", "record_offset", "link_index"]


class IncompleteChunksError(RuntimeError):
    pass


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


def require_complete_chunks(storage: Storage, crawl: str, layout: Layout) -> None:
    missing = sorted(set(layout.chunk_keys()) - complete_chunks(storage, crawl, layout))
    if missing:
        raise IncompleteChunksError(
            f"{crawl}: candidate_pairs of {len(missing)} chunk(s) not complete yet: {', '.join(missing[:10])}")


def dedup_files(storage: Storage, chunk_files: list[str], earlier_files: list[str], out_key: str) -> DedupReport:
    """Exact dedup of pair files (storage keys) on the normalized URL, minus the URLs of earlier files;
    writes the unique pairs with an `occurrences` count per URL to out_key.

    The output is sorted by URL and each URL keeps its first occurrence in (wat_file, offset, link) order,
    so it does not depend on the order in which the inputs were made."""
    import polars as pl  # imported here: the parse stage's hot path does not need it

    start = time.perf_counter()
    report = DedupReport(chunks=len(chunk_files))
    with storage.local_copies(chunk_files + earlier_files) as local, storage.staging_dir() as stage:
        pairs = pl.scan_parquet(local[: len(chunk_files)])
        report.rows_in = pairs.select(pl.len()).collect().item()
        result = unique_by_url(pairs)
        if earlier_files:
            result = result.join(pl.scan_parquet(local[len(chunk_files):]).select("url"), on="url", how="anti")
        out = os.path.join(stage, "unique.parquet")
        result.sink_parquet(out, compression="zstd")
        report.unique_in_crawl = pairs.select(pl.col("url").n_unique()).collect(engine="streaming").item()
        report.rows_out = pq.ParquetFile(out).metadata.num_rows
        report.seen_in_earlier_crawls = report.unique_in_crawl - report.rows_out
        report.bytes_out = os.path.getsize(out)
        report.preview = pl.scan_parquet(out).head(10).collect().to_dicts()
        storage.put_file(out, out_key)
    report.seconds = time.perf_counter() - start
    return report


def dedup_bucket(storage: Storage, crawl: str, bucket: str, layout: Layout, earlier_crawls: list[str]) -> DedupReport:
    """`unique_pairs` of one bucket from every chunk of the crawl, against the bucket of earlier crawls."""
    require_complete_chunks(storage, crawl, layout)
    chunk_files = [paths.candidates_file(crawl, c, bucket, layout) for c in layout.chunk_keys()]
    earlier = [(c, paths.unique_pairs(c, bucket, layout)) for c in sorted(earlier_crawls)]
    earlier = [(c, key) for c, key in earlier if storage.exists(key)]
    report = dedup_files(storage, chunk_files, [key for _, key in earlier], paths.unique_pairs(crawl, bucket, layout))
    report.earlier_crawls = [c for c, _ in earlier]
    return report
