"""The crawl's image dedup: every kept, not removed sample of every bucket, against each other and against the
samples earlier crawls released (see `dedup.py` for the winner rule and the near-duplicate index)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.release.dedup import mark_duplicates
from laion_assets.core.release.filtered import RemovalMatcher
from laion_assets.core.storage import Storage

if TYPE_CHECKING:
    import polars as pl

# `removed`: the reason a removal list gives (such a sample competes for nothing); `removal_version`: the list's.
IMAGE_DEDUP_COLUMNS = ["crawl", "bucket", "key", "sample_id", "url", "sha256", "phash", "duplicate_of",
                       "near_duplicate_of", "removed", "removal_version"]


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


def dedup_crawl(store: Storage, crawl: str, downloads: Mapping[str, ShardsManifest],
                scores: Mapping[str, pl.LazyFrame | pl.DataFrame], earlier: Mapping[str, pl.LazyFrame],
                radius: int, removals: RemovalMatcher | None = None, removal_version: str = ""
                ) -> tuple[pl.DataFrame, ImageDedupReport]:
    """The crawl's kept samples with duplicate_of / near_duplicate_of, and a report. `downloads` and `scores` are
    keyed by bucket; `earlier` maps each earlier crawl to its own image dedup table, whose winners (not duplicates
    themselves) compete first."""
    import polars as pl

    start = time.perf_counter()
    report = ImageDedupReport(radius=radius, earlier_crawls=sorted(earlier))
    missing = sorted(set(downloads) ^ set(scores))
    if missing:
        raise ValueError(f"{crawl}: buckets {missing} have downloads or scores but not both")
    frames = [bucket_candidates(store, crawl, b, downloads[b], scores[b]) for b in sorted(downloads)]
    ours = pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.String for c in
                                                                ["crawl", "bucket", "key", "url", "sha256", "phash"]})
    if removals is not None and ours.height:
        ours = ours.with_columns(removals(ours.select("url", "sha256", "phash")).alias("removed"))
        report.removed = {r: int(n) for r, n in ours.filter(pl.col("removed").is_not_null())
                          .group_by("removed").len().iter_rows()}
    else:
        ours = ours.with_columns(pl.lit(None, pl.String).alias("removed"))
    ours = ours.with_columns(pl.concat_str(["crawl", "bucket", "key"], separator="/").alias("sample_id"),
                             pl.lit(removal_version, pl.String).alias("removal_version"))
    before = [lf.filter(pl.col("duplicate_of").is_null() & pl.col("removed").is_null())
              .select("sample_id", "url", "sha256", "phash")
              for _, lf in sorted(earlier.items())]
    theirs = pl.concat(before).collect() if before else ours.select("sample_id", "url", "sha256", "phash").clear()
    if removals is not None and theirs.height:
        # A sample removed since its crawl was released cannot win (its own release drops it when rebuilt).
        theirs = theirs.filter(removals(theirs.select("url", "sha256", "phash")).is_null())
    report.against_earlier_samples = theirs.height
    competing = ours.filter(pl.col("removed").is_null()).select("sample_id", "sha256", "phash")
    marked, _ = mark_duplicates(pl.concat([theirs.drop("url"), competing]), radius)
    out = (ours.join(marked.select("sample_id", "duplicate_of", "near_duplicate_of"), on="sample_id", how="left")
           .select(IMAGE_DEDUP_COLUMNS).sort("sample_id"))
    report.samples = out.height
    report.exact_duplicates = int(out["duplicate_of"].is_not_null().sum())
    report.near_duplicates = int(out["near_duplicate_of"].is_not_null().sum())
    report.seconds = time.perf_counter() - start
    return out, report
