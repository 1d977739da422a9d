"""Exact dedup of one URL bucket: within the crawl (every chunk's share of the bucket) and against the same
bucket of earlier crawls. Deterministic whatever order the chunks ran in."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

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


def plan_dedup(storage: Storage, chunk_files: list[str], earlier: list[tuple[str, str]]
               ) -> tuple[pl.LazyFrame, DedupReport]:
    """The unique pairs of some pair files (storage keys) as a lazy plan, minus the URLs of earlier crawls' unique
    pairs ((crawl, key) pairs), and a report of the counts that need no result (a second pass would).

    The plan is sorted by URL and each URL keeps its first occurrence in (wat_file, offset, link) order, so it does
    not depend on the order in which the inputs were made. Its files stay readable until this process ends."""
    import polars as pl  # imported here: the parse stage's hot path does not need it

    report = DedupReport(chunks=len(chunk_files), earlier_crawls=[c for c, _ in earlier])
    local = storage.scratch_copies(chunk_files + [key for _, key in earlier])
    pairs = pl.scan_parquet(local[: len(chunk_files)])
    counts = pairs.select(pl.len().alias("rows"), pl.col("url").n_unique().alias("urls")).collect(engine="streaming")
    report.rows_in, report.unique_in_crawl = int(counts["rows"][0]), int(counts["urls"][0])
    unique = unique_by_url(pairs)
    if earlier:
        seen = pl.scan_parquet(local[len(chunk_files):]).select("url").unique()
        report.seen_in_earlier_crawls = int(
            pairs.select("url").unique().join(seen, on="url", how="semi").select(pl.len()).collect().item())
        unique = unique.join(seen, on="url", how="anti")
    report.rows_out = report.unique_in_crawl - report.seen_in_earlier_crawls
    return unique, report


def earlier_unique_pairs(storage: Storage, earlier_crawls: list[str], bucket: str, layout: Layout
                         ) -> list[tuple[str, str]]:
    """(crawl, key) of the same bucket's unique pairs of earlier crawls, where they exist."""
    keys = [(c, paths.unique_pairs(c, bucket, layout)) for c in sorted(earlier_crawls)]
    return [(c, key) for c, key in keys if storage.exists(key)]


def dedup_bucket(storage: Storage, crawl: str, bucket: str, layout: Layout, earlier_crawls: list[str]) -> DedupReport:
    """`unique_pairs` of one bucket from every chunk of the crawl, against the bucket of earlier crawls, written."""
    start = time.perf_counter()
    require_complete_chunks(storage, crawl, layout)
    chunk_files = [paths.candidates_file(crawl, c, bucket, layout) for c in layout.chunk_keys()]
    unique, report = plan_dedup(storage, chunk_files, earlier_unique_pairs(storage, earlier_crawls, bucket, layout))
    with storage.staging_dir() as stage:
        out = os.path.join(stage, "unique.parquet")
        unique.sink_parquet(out, compression="zstd")
        report.bytes_out = os.path.getsize(out)
        report.preview = pl_head(out)
        storage.put_file(out, paths.unique_pairs(crawl, bucket, layout))
    report.seconds = time.perf_counter() - start
    return report


def pl_head(path: str, n: int = 10) -> list[dict[str, Any]]:
    import polars as pl

    return pl.scan_parquet(path).head(n).collect().to_dicts()
