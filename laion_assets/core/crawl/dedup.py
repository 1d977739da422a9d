"""Exact dedup of one URL bucket: within the crawl (every chunk's share of the bucket) and against the same
bucket of earlier crawls. Deterministic whatever order the chunks ran in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from laion_assets.core import paths
from laion_assets.core.paths import Layout
from laion_assets.core.storage import Storage

if TYPE_CHECKING:
    import polars as pl

# The first occurrence in crawl order represents a URL: the same whatever order the chunks ran in.
ORDER = ["url", "wat_file", "record_offset", "link_index"]


class IncompleteChunksError(RuntimeError):
    """A pair file of the bucket is missing: its chunk has not been extracted completely."""


@dataclass
class DedupReport:
    rows_in: int = 0
    unique_in_crawl: int = 0
    seen_in_earlier_crawls: int = 0
    rows_out: int = 0
    chunks: int = 0
    earlier_crawls: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        data = asdict(self)
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


def run(storage: Storage, pair_files: list[str], earlier: Sequence[tuple[str, str]] = ()
        ) -> tuple[pl.LazyFrame, DedupReport]:
    """The URL dedup's entry point: the unique pairs of some pair files (storage keys) as a lazy plan, minus the URLs
    of earlier crawls' unique pairs ((crawl, key) pairs; those that do not exist are skipped), and a report of the
    counts that need no result (a second pass would).

    The plan is sorted by URL and each URL keeps its first occurrence in (wat_file, offset, link) order, so it does
    not depend on the order in which the inputs were made. Its files stay readable until this process ends: the
    caller streams it to where it goes."""
    import polars as pl  # imported here: the parse stage's hot path does not need it

    missing = [key for key in pair_files if not storage.exists(key)]
    if missing:
        raise IncompleteChunksError(f"{len(missing)} pair file(s) missing, their chunks not complete yet: "
                                    f"{', '.join(missing[:10])}")
    earlier = [(c, key) for c, key in sorted(earlier) if storage.exists(key)]
    report = DedupReport(chunks=len(pair_files), earlier_crawls=[c for c, _ in earlier])
    local = storage.scratch_copies(pair_files + [key for _, key in earlier])
    pairs = pl.scan_parquet(local[: len(pair_files)])
    counts = pairs.select(pl.len().alias("rows"), pl.col("url").n_unique().alias("urls")).collect(engine="streaming")
    report.rows_in, report.unique_in_crawl = int(counts["rows"][0]), int(counts["urls"][0])
    unique = unique_by_url(pairs)
    if earlier:
        seen = pl.scan_parquet(local[len(pair_files):]).select("url").unique()
        report.seen_in_earlier_crawls = int(
            pairs.select("url").unique().join(seen, on="url", how="semi").select(pl.len()).collect().item())
        unique = unique.join(seen, on="url", how="anti")
    report.rows_out = report.unique_in_crawl - report.seen_in_earlier_crawls
    return unique, report


def chunk_files(crawl: str, bucket: str, layout: Layout) -> list[str]:
    """One bucket's share of every chunk of the crawl (what `run` reads for that bucket)."""
    return [paths.candidates_file(crawl, c, bucket, layout) for c in layout.chunk_keys()]
