"""The crawl's semantic dedup: every embedded, kept, not removed sample that is not an exact duplicate, compared by
image embedding with every other one of the crawl and with the winners of earlier crawls (see `semdedup.py` for
the k-means, the pairs and the winner rule).

What competes: a sample of this crawl that the image dedup did not mark as an exact duplicate (its bytes are an
earlier sample's: it is that sample's semantic duplicate too, and already marked) and that no removal list names
(the one the image dedup applied, or the latest); of an earlier crawl, a sample its own semantic dedup did not mark
and no list names now. Removed samples are never added, so they neither win nor are marked. Every embedded sample
of the crawl gets a row, marked or not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.clip.embeddings import embedding_model, read_image_embeddings, sample_keys
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.release.filtered import RemovalMatcher
from laion_assets.core.release.semdedup import SemanticDeduper, check_model
from laion_assets.core.settings import ReleaseSettings
from laion_assets.core.storage import LocalParquet, Storage, scratch_folder

if TYPE_CHECKING:
    import polars as pl

SEMANTIC_DEDUP_COLUMNS = ["crawl", "bucket", "key", "sample_id", "semantic_duplicate_of", "semantic_similarity",
                          "removed", "model", "removal_version"]
SEMANTIC_DEDUP_SCHEMA = pa.schema([(c, pa.float32() if c == "semantic_similarity" else pa.string())
                                   for c in SEMANTIC_DEDUP_COLUMNS])


@dataclass
class SemanticDedupReport:
    samples: int = 0  # embedded samples of the crawl (one row each)
    compared: int = 0  # of them, those that competed
    duplicates: int = 0
    share: float = 0.0  # duplicates / samples
    pairs: int = 0  # pairs above the threshold found (earlier crawls' included)
    removed: dict[str, int] = field(default_factory=dict)
    exact_duplicates_skipped: int = 0
    against_earlier_samples: int = 0
    earlier_crawls: list[str] = field(default_factory=list)
    model: str = ""
    eps: float = 0.0
    partitions: int = 0
    clusters: int = 0
    largest_cluster: int = 0
    spilled: bool = False
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {**asdict(self), "share": round(self.share, 6), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class EarlierCrawl:
    """An earlier crawl: its own semantic dedup table and where its buckets' embeddings are."""

    table: pl.LazyFrame
    embeddings: Mapping[str, EmbeddingKeys]


def run(store: Storage, crawl: str, embeddings: Mapping[str, EmbeddingKeys], image_dedup: pl.LazyFrame,
        earlier: Mapping[str, EarlierCrawl], settings: ReleaseSettings, expected_model: str = "",
        removals: RemovalMatcher | None = None, removal_version: str = "", expected_dim: int = 0
        ) -> tuple[LocalParquet, SemanticDedupReport]:
    """The semantic dedup's entry point: one row per embedded sample of the crawl with `semantic_duplicate_of`
    (a local Parquet file that lives as long as the process, one row group per bucket, sorted by key) and a report.
    `embeddings` is keyed by bucket; `image_dedup` is the crawl's image dedup table (its removals and exact
    duplicates); `expected_model`: the embedding model the registry names (embeddings that say they are another
    one, or an earlier crawl's dedup of another model, are an EmbeddingModelMismatch naming both)."""
    import polars as pl

    start = time.perf_counter()
    eps = settings.semantic_eps
    report = SemanticDedupReport(earlier_crawls=sorted(earlier), eps=eps, model=expected_model)
    buckets = sorted(embeddings)
    theirs = {c: sorted(e.embeddings) for c, e in sorted(earlier.items())}
    sources = [(crawl, b) for b in buckets] + [(c, b) for c, bs in theirs.items() for b in bs]
    work = scratch_folder("semantic-dedup-")
    expected_rows = _image_dedup_rows(image_dedup) + sum(_competing_rows(e.table) for e in earlier.values())
    deduper = SemanticDeduper(sources, eps, os.path.join(work, "spill"), expected_rows,
                              settings.semantic_partition_rows, settings.semantic_cluster_rows, expected_dim)
    for c, bs in theirs.items():
        models = earlier[c].table.select(pl.col("model").unique()).collect()["model"].drop_nulls().to_list()
        for found in models:
            check_model(found, expected_model, 0, 0, f"{c} (an earlier crawl's semantic_dedup)")
        for b in bs:
            report.against_earlier_samples += _add_earlier(store, deduper, c, b, earlier[c], removals,
                                                           expected_model)
    ours: list[tuple[str, str]] = []
    for b in buckets:
        img, meta = read_image_embeddings(store, embeddings[b])
        found = embedding_model(meta)
        check_model(found, expected_model, img.shape[1] if img.ndim == 2 else 0, deduper.dim,
                    f"{crawl}/{b} ({store.uri(embeddings[b].metadata)})")
        report.model = report.model or found
        keys = pl.Series("key", sample_keys(meta))
        marks = _bucket_marks(image_dedup, b, keys, removals)
        competes = marks["removed"].is_null() & marks["duplicate_of"].is_null()
        report.exact_duplicates_skipped += int((marks["removed"].is_null() & marks["duplicate_of"].is_not_null())
                                               .sum())
        for reason, n in marks.filter(pl.col("removed").is_not_null()).group_by("removed").len().iter_rows():
            report.removed[reason] = report.removed.get(reason, 0) + int(n)
        ordered = deduper.add(crawl, b, keys, img, competes.to_numpy())
        del img
        path = os.path.join(work, f"ours-{len(ours):06d}.arrow")
        ordered.join(marks.select("key", "removed"), on="key", how="left", maintain_order="left").write_ipc(
            path, compression="uncompressed")
        ours.append((b, path))
        report.compared += int(competes.sum())
    found_marks = deduper.finish()
    names = deduper.names(found_marks["semantic_duplicate_of"])
    out = os.path.join(work, "semantic_dedup.parquet")
    with pq.ParquetWriter(out, SEMANTIC_DEDUP_SCHEMA, compression="zstd") as writer:
        for b, path in ours:
            table = (pl.read_ipc(path).join(found_marks, on="sid", how="left", maintain_order="left")
                     .join(names.rename({"sid": "semantic_duplicate_of", "name": "_winner"}),
                           on="semantic_duplicate_of", how="left", maintain_order="left")
                     .select(pl.lit(crawl).alias("crawl"), pl.lit(b).alias("bucket"), "key",
                             pl.concat_str([pl.lit(f"{crawl}/{b}/"), pl.col("key")]).alias("sample_id"),
                             pl.col("_winner").alias("semantic_duplicate_of"), "semantic_similarity", "removed",
                             pl.lit(report.model or expected_model, pl.String).alias("model"),
                             pl.lit(removal_version, pl.String).alias("removal_version")))
            os.unlink(path)
            report.samples += table.height
            report.duplicates += int(table["semantic_duplicate_of"].is_not_null().sum())
            writer.write_table(table.to_arrow().cast(SEMANTIC_DEDUP_SCHEMA))
    counts = deduper.counts
    report.pairs, report.partitions, report.clusters = counts.pairs, counts.partitions, counts.clusters
    report.largest_cluster, report.spilled = counts.largest_cluster, counts.spilled
    report.share = report.duplicates / report.samples if report.samples else 0.0
    report.removed = dict(sorted(report.removed.items()))
    report.seconds = time.perf_counter() - start
    return LocalParquet(out), report


def _image_dedup_rows(table: pl.LazyFrame) -> int:
    import polars as pl

    return int(table.select(pl.len()).collect().item())


def _competing_rows(table: pl.LazyFrame) -> int:
    import polars as pl

    return int(table.filter(pl.col("semantic_duplicate_of").is_null() & pl.col("removed").is_null())
               .select(pl.len()).collect().item())


def _bucket_marks(image_dedup: pl.LazyFrame, bucket: str, keys: pl.Series,
                  removals: RemovalMatcher | None) -> pl.DataFrame:
    """For each embedded key of the bucket (in `keys`' order): the image dedup's duplicate_of and the removal
    reason (the image dedup's, else the latest list's)."""
    import polars as pl

    rows = (image_dedup.filter(pl.col("bucket") == bucket)
            .select("key", "url", "sha256", "phash", "duplicate_of", "removed").collect())
    if removals is not None and rows.height:
        rows = rows.with_columns(pl.col("removed").fill_null(removals(rows.select("url", "sha256", "phash"))))
    return (pl.DataFrame({"key": keys}).join(rows.select("key", "duplicate_of", "removed"), on="key", how="left",
                                             maintain_order="left"))


def _add_earlier(store: Storage, deduper: SemanticDeduper, crawl: str, bucket: str, earlier: EarlierCrawl,
                 removals: RemovalMatcher | None, expected_model: str) -> int:
    """An earlier crawl's bucket: its winners compete (not what its semantic dedup marked, nor what its removal
    list named, nor what a removal list names now)."""
    import polars as pl

    img, meta = read_image_embeddings(store, earlier.embeddings[bucket])
    check_model(embedding_model(meta), expected_model, img.shape[1], deduper.dim,
                f"{crawl}/{bucket} ({store.uri(earlier.embeddings[bucket].metadata)})")
    keys = pl.Series("key", sample_keys(meta))
    winners = (earlier.table.filter((pl.col("bucket") == bucket) & pl.col("semantic_duplicate_of").is_null()
                                    & pl.col("removed").is_null()).select("key").collect())
    competes = pl.DataFrame({"key": keys}).with_columns(pl.col("key").is_in(winners["key"].implode()).alias("c"))
    if removals is not None and len(meta) and {"url"} <= set(meta.column_names):
        named = removals(pl.DataFrame({"url": meta["url"].to_pylist(), "sha256": _column(meta, "sha256"),
                                       "phash": _column(meta, "phash")}, schema={c: pl.String for c in
                                                                                  ("url", "sha256", "phash")}))
        competes = competes.with_columns(pl.col("c") & named.is_null())
    mask = competes["c"].to_numpy()
    deduper.add(crawl, bucket, keys, img, mask)
    return int(np.count_nonzero(mask))


def _column(meta: pa.Table, name: str) -> list:
    return meta[name].to_pylist() if name in meta.column_names else [None] * meta.num_rows
