"""The crawl's image dedup: every kept, not removed sample of every bucket, against each other and against the
samples earlier crawls released (see `dedup.py` for the winner rule and the near-duplicate index)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.release.dedup import PARTITION_ROWS, ImageDeduper
from laion_assets.core.release.filtered import RemovalMatcher
from laion_assets.core.storage import LocalParquet, Storage, scratch_folder

if TYPE_CHECKING:
    import polars as pl

# `removed`: the reason a removal list gives (such a sample competes for nothing); `removal_version`: the list's.
IMAGE_DEDUP_COLUMNS = ["crawl", "bucket", "key", "sample_id", "url", "sha256", "phash", "duplicate_of",
                       "near_duplicate_of", "removed", "removal_version"]
IMAGE_DEDUP_SCHEMA = pa.schema([(c, pa.string()) for c in IMAGE_DEDUP_COLUMNS])


@dataclass
class ImageDedupReport:
    samples: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    against_earlier_samples: int = 0
    earlier_crawls: list[str] = field(default_factory=list)
    radius: int = 4
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def bucket_candidates(store: Storage, crawl: str, bucket: str, manifest: ShardsManifest,
                      scores: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """The kept samples of one bucket: crawl, bucket, key, url, sha256, phash."""
    import polars as pl

    keys = list(manifest.keys())
    if not keys:
        return pl.DataFrame(schema={c: pl.String for c in ["crawl", "bucket", "key", "url", "sha256", "phash"]})
    kept = scores.lazy().filter(pl.col("keep")).select("key")
    # One lazy polars scan: only the five columns are read and failed rows are dropped while reading, so the
    # whole download's rows are never held (reading them with pyarrow first cost four times the memory).
    with store.local_copies([k.rows for k in keys]) as local:
        rows = pl.concat([pl.scan_parquet(path).select("key", "url", "status", "sha256", "phash") for path in local],
                         how="vertical_relaxed")
        return (rows.filter(pl.col("status") == "success").join(kept, on="key", how="semi")
                .select(pl.lit(crawl).alias("crawl"), pl.lit(bucket).alias("bucket"), "key", "url", "sha256", "phash")
                .collect())


def run(store: Storage, crawl: str, downloads: Mapping[str, ShardsManifest],
        scores: Mapping[str, pl.LazyFrame | pl.DataFrame], earlier: Mapping[str, pl.LazyFrame],
        radius: int, removals: RemovalMatcher | None = None, removal_version: str = "",
        partition_rows: int = PARTITION_ROWS) -> tuple[LocalParquet, ImageDedupReport]:
    """The image dedup's entry point: the crawl's kept samples with duplicate_of / near_duplicate_of (a local Parquet
    file that lives as long as the process, sorted by sample_id), and a report. `downloads` and `scores` are keyed
    by bucket; `earlier` maps each earlier crawl to its own image dedup table, whose winners (not duplicates
    themselves) compete first.

    One bucket (or one earlier crawl's bucket) and one dedup partition are in memory at a time: the memory does not
    grow with the crawl (see `dedup.py`)."""
    import polars as pl
    start = time.perf_counter()
    report = ImageDedupReport(radius=radius, earlier_crawls=sorted(earlier))
    missing = sorted(set(downloads) ^ set(scores))
    if missing:
        raise ValueError(f"{crawl}: buckets {missing} have downloads or scores but not both")
    buckets = sorted(downloads)
    theirs = {c: _buckets_of(lf) for c, lf in sorted(earlier.items())}
    sources = [(crawl, b) for b in buckets] + [(c, b) for c, bs in theirs.items() for b in bs]
    expected = sum(m.rows for m in downloads.values()) + sum(_rows_of(lf) for lf in earlier.values())
    work = scratch_folder("image-dedup-")
    deduper = ImageDeduper(sources, radius, os.path.join(work, "spill"), expected, partition_rows)
    for c, bs in theirs.items():
        for b in bs:
            report.against_earlier_samples += _add_earlier(deduper, c, b, earlier[c], removals)
    ours: list[str] = []
    for b in buckets:
        rows = bucket_candidates(store, crawl, b, downloads[b], scores[b])
        removed = (removals(rows.select("url", "sha256", "phash")) if removals is not None and rows.height
                   else pl.repeat(None, rows.height, dtype=pl.String, eager=True))
        rows = rows.with_columns(removed.alias("removed"))
        ordered = deduper.add(crawl, b, rows.with_columns(pl.col("removed").is_null().alias("competes")))
        ours.append(os.path.join(work, f"ours-{len(ours):06d}.arrow"))
        ordered.drop("competes").write_ipc(ours[-1], compression="uncompressed")
        for reason, n in rows.filter(pl.col("removed").is_not_null()).group_by("removed").len().iter_rows():
            report.removed[reason] = report.removed.get(reason, 0) + int(n)
    marks = deduper.finish()
    names = deduper.names(pl.concat([marks["duplicate_of"], marks["near_duplicate_of"]]))
    # Written here, one row group per bucket, and stored by the IO manager as it is: streaming a LazyFrame into the
    # stored file (an Arrow file scanned again) peaked at the size of the whole table.
    out = os.path.join(work, "image_dedup.parquet")
    with pq.ParquetWriter(out, IMAGE_DEDUP_SCHEMA, compression="zstd") as writer:
        for path in ours:
            table = _marked(pl.read_ipc(path), marks, names, removal_version)
            os.unlink(path)
            report.samples += table.height
            report.exact_duplicates += int(table["duplicate_of"].is_not_null().sum())
            report.near_duplicates += int(table["near_duplicate_of"].is_not_null().sum())
            writer.write_table(table.to_arrow().cast(IMAGE_DEDUP_SCHEMA))
    shutil.rmtree(os.path.join(work, "spill"), ignore_errors=True)
    report.removed = dict(sorted(report.removed.items()))
    report.seconds = time.perf_counter() - start
    return LocalParquet(out), report


def _buckets_of(table: pl.LazyFrame) -> list[str]:
    import polars as pl

    return sorted(table.select(pl.col("bucket").unique()).collect(engine="streaming")["bucket"].to_list())


def _rows_of(table: pl.LazyFrame) -> int:
    import polars as pl

    return int(table.select(pl.len()).collect().item())


def _add_earlier(deduper: ImageDeduper, crawl: str, bucket: str, table: pl.LazyFrame,
                 removals: RemovalMatcher | None) -> int:
    """An earlier crawl's bucket: its winners compete (not its duplicates, nor what a removal list names now: a
    sample removed since its crawl was released cannot win; its own release drops it when rebuilt)."""
    import polars as pl

    rows = (table.filter((pl.col("bucket") == bucket) & pl.col("duplicate_of").is_null()
                         & pl.col("removed").is_null())
            .select("key", "url", "sha256", "phash").collect())
    competes = (removals(rows.select("url", "sha256", "phash")).is_null() if removals is not None and rows.height
                else pl.repeat(True, rows.height, dtype=pl.Boolean, eager=True))
    deduper.add(crawl, bucket, rows.select("key", "sha256", "phash").with_columns(competes.alias("competes")))
    return int(competes.sum())


def _marked(ordered: pl.DataFrame, marks: pl.DataFrame, names: pl.DataFrame, removal_version: str) -> pl.DataFrame:
    """One bucket's rows (sorted by key) with the names of the samples they duplicate."""
    import polars as pl

    return (ordered.join(marks, on="sid", how="left", maintain_order="left")
            .join(names.rename({"sid": "duplicate_of", "name": "_dup"}), on="duplicate_of", how="left",
                  maintain_order="left")
            .join(names.rename({"sid": "near_duplicate_of", "name": "_near"}), on="near_duplicate_of", how="left",
                  maintain_order="left")
            .select("crawl", "bucket", "key",
                    pl.concat_str(["crawl", "bucket", "key"], separator="/").alias("sample_id"), "url", "sha256",
                    "phash", pl.col("_dup").alias("duplicate_of"), pl.col("_near").alias("near_duplicate_of"),
                    "removed", pl.lit(removal_version, pl.String).alias("removal_version")))
