"""The filtered metadata of one crawl x bucket: every sample that downloaded, passed the CLIP threshold and is not
removed, in LAION-5B's columns (plus ours), joined from the download rows, the CLIP scores, the safety, aesthetic
and watermark scores, the unique pairs' language score, the crawl's image dedup and its semantic dedup.

A kept sample with no safety, aesthetic or watermark score (its image failed to decode there) keeps its row with a
null `punsafe` / `aesthetic` / `pwatermark`, as any row that is missing a score; a sample a removal list names is not
written, and is counted under its reason, and so is one the concept filter flags (reason `concept-filter`: the
safety scores' `concept_filtered`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from laion_assets.core import paths
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.download.writer import ROW_SCHEMA
from laion_assets.core.records import JsonRecord
from laion_assets.core.release.columns import (
    FILTERED_SCHEMA,
    PARQUET_OPTIONS,
    filtered_dtypes,
    subset_expr,
    url_text_hash_expr,
)
from laion_assets.core.storage import Storage

CONCEPT_FILTER = "concept-filter"  # the removal reason of a sample the concept filter flags (core/clip/concepts.py)

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

# Given the candidate rows (URL, sha256, phash columns), the reason each one is removed, or null.
RemovalMatcher = Callable[["pl.DataFrame"], "pl.Series"]
DOWNLOAD_COLUMNS = ["key", "url", "caption", "status", "original_width", "original_height", "sha256", "phash",
                    "language"]


@dataclass
class FilteredBucket(JsonRecord):
    """What `filtered_metadata` made for one bucket: its Parquet file (relative to the storage root) and counts."""

    crawl: str
    bucket: str
    file: str
    rows: int
    downloaded: int
    kept: int
    removed: dict[str, int] = field(default_factory=dict)  # reason -> samples
    removal_version: str = ""
    subsets: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    semantic_duplicates: int = 0
    models: dict[str, Any] = field(default_factory=dict)  # what produced the columns: model -> threshold
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        return {"rows": self.rows, "downloaded": self.downloaded, "kept": self.kept,
                "removed": sum(self.removed.values()), "removed_by_reason": self.removed,
                "removal_version": self.removal_version, "subsets": self.subsets,
                "exact_duplicates": self.exact_duplicates, "near_duplicates": self.near_duplicates,
                "semantic_duplicates": self.semantic_duplicates, "models": self.models,
                "seconds": round(self.seconds, 3)}


class MissingScoresError(ValueError):
    """The bucket's inputs do not belong together (a kept sample that the download never made)."""


def download_rows(store: Storage, manifest: ShardsManifest) -> pl.DataFrame:
    """Every row of a finished download with the storage key of the tar its image is in (`shard`)."""
    import polars as pl

    keys = list(manifest.keys())
    if not keys:
        return pl.DataFrame(schema={c: pl.String for c in DOWNLOAD_COLUMNS} | {"shard": pl.String})
    # One polars scan of only the needed columns (several times faster than pyarrow's read_table + from_arrow
    # on one core); collected inside local_copies, which are temporary downloads on S3.
    with store.local_copies([k.rows for k in keys]) as local:
        scans = [pl.scan_parquet(path) for path in local]
        frames = [scan.select([*DOWNLOAD_COLUMNS, *added_columns(scan.collect_schema().names())])
                  .with_columns(pl.lit(k.tar).alias("shard")) for scan, k in zip(scans, keys, strict=True)]
        # diagonal: a column one shard lacks (added by a later incremental run) is null there, never an error.
        return pl.concat(frames, how="diagonal_relaxed").collect()


def added_columns(names: list[str]) -> list[str]:
    """The columns a download's rows carry beyond ours (`save_additional_columns`, a URL list's id column such as
    DataComp's `uid`, compute_hash's digest, exif): kept through the filtered metadata into the release, so a release
    can be joined back to the list it came from."""
    ours = set(ROW_SCHEMA.names)
    return [n for n in names if n not in ours]


def released_name(column: str) -> str:
    """An added column's name in the filtered metadata: its own, or `input_<name>` where it would collide with one
    of LAION's or our release columns (a list with its own `hash` or `subset`)."""
    return f"input_{column}" if column in FILTERED_SCHEMA.names else column


def kept_samples(downloads: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """The downloaded samples the CLIP filter kept, with their similarity, in the order of `downloads`. Both have
    the join column `_k` (see `join_keys`)."""
    import polars as pl

    ok = downloads.filter(pl.col("status") == "success")
    kept = scores.filter(pl.col("keep")).select("_k", "key", "similarity")
    joined = ok.join(kept.drop("key"), on="_k", how="inner", maintain_order="left")
    if joined.height != kept.height:
        unknown = kept.join(ok, on="_k", how="anti")["key"].head(5).to_list()
        raise MissingScoresError(f"{kept.height - joined.height} kept samples have no downloaded image in the "
                                 f"bucket's shards (keys {unknown}): clip_scores and image_shards do not match")
    return joined


def join_keys(*tables: pl.DataFrame) -> list[pl.DataFrame]:
    """The tables sorted by a join column `_k`: the key as an integer when every key of every table is one (the
    download's keys are digits, and a join of sorted integers is several times faster than one of strings), else
    the key itself."""
    import polars as pl

    parsed = [t.with_columns(pl.col("key").str.to_integer(base=10, dtype=pl.UInt64, strict=False).alias("_k"))
              for t in tables]
    if any(p["_k"].null_count() for p in parsed):
        parsed = [t.with_columns(pl.col("key").alias("_k")) for t in tables]
    # A sorted flag lets polars merge instead of hashing; the download's rows usually come sorted already.
    return [p.with_columns(pl.col("_k").set_sorted()) if p["_k"].is_sorted() else p.sort("_k") for p in parsed]


def with_language_score(downloads: pl.DataFrame, language_scores: pl.DataFrame) -> pl.DataFrame:
    """The download rows with the language score of their URL. The download keeps its input's order (keys sort as
    input rows), so when the rows and the unique pairs line up URL for URL the score is taken by position; a join on
    URL strings (a third of the stage's time) is left for inputs that do not line up."""
    import polars as pl

    scores = language_scores.select("url", pl.col("language_score").cast(pl.Float32))
    if (scores.height == downloads.height and downloads["key"].is_sorted()
            and bool(downloads["url"].eq_missing(scores["url"]).all())):
        return downloads.with_columns(scores["language_score"])
    return downloads.join(scores.unique("url"), on="url", how="left", maintain_order="left")


def build_filtered(crawl: str, bucket: str, downloads: pl.DataFrame, scores: pl.DataFrame, safety: pl.DataFrame,
                   watermark: pl.DataFrame, language_scores: pl.DataFrame, duplicates: pl.DataFrame,
                   removals: RemovalMatcher | None = None, aesthetic: pl.DataFrame | None = None,
                   semantic: pl.DataFrame | None = None) -> tuple[pl.DataFrame, dict[str, int]]:
    """The bucket's rows in FILTERED_SCHEMA order, sorted by key, and the samples removed per reason.

    `duplicates`: key, duplicate_of, near_duplicate_of of this bucket's samples (from the crawl's image dedup);
    `language_scores`: url, language_score (from the unique pairs); `safety`: key, punsafe and, when the concept
    filter ran, concept_filtered; `aesthetic`: key, aesthetic (None: no aesthetic scores, a null column);
    `semantic`: key, semantic_duplicate_of (from the crawl's semantic dedup; None: a null column)."""
    import polars as pl

    if aesthetic is None:
        aesthetic = pl.DataFrame(schema={"key": pl.String, "aesthetic": pl.Float32})
    if semantic is None:
        semantic = pl.DataFrame(schema={"key": pl.String, "semantic_duplicate_of": pl.String})
    added = [pl.col(c).alias(released_name(c)) for c in added_columns(downloads.columns) if c != "shard"]
    flagged = safety.filter(pl.col("concept_filtered").fill_null(False)).select("key") if (
        "concept_filtered" in safety.columns) else safety.clear().select("key")

    marks = duplicates.select("key", "duplicate_of", "near_duplicate_of",
                              (pl.col("removed") if "removed" in duplicates.columns else pl.lit(None, pl.String))
                              .alias("_dedup_removed"))
    downloads, scores, safety, watermark, marks, aesthetic, flagged, semantic = join_keys(
        with_language_score(downloads, language_scores), scores, safety.select("key", "punsafe"),
        watermark.select("key", "pwatermark"), marks, aesthetic.select("key", "aesthetic"),
        flagged.with_columns(pl.lit(CONCEPT_FILTER).alias("_concept")),
        semantic.select("key", "semantic_duplicate_of"))
    rows = kept_samples(downloads, scores).join(marks.drop("key"), on="_k", how="left", maintain_order="left")
    # Removed: what the list applied by the image dedup named, or what the list applied now names (the newer
    # one, when a version came since: a rebuild never brings a removed sample back).
    now = removals(rows.select("url", "sha256", "phash")) if removals is not None and rows.height else None
    rows = rows.with_columns(now.alias("_removed") if now is not None else pl.lit(None, pl.String).alias("_removed"))
    rows = rows.with_columns(pl.col("_removed").fill_null(pl.col("_dedup_removed")))
    # The concept filter's verdict (after a removal list's, which names its own reason).
    rows = (rows.join(flagged.drop("key"), on="_k", how="left", maintain_order="left")
            .with_columns(pl.col("_removed").fill_null(pl.col("_concept"))).drop("_concept"))
    removed = {r: int(n) for r, n in rows.filter(pl.col("_removed").is_not_null())
               .group_by("_removed").len().sort("_removed").iter_rows()}
    rows = (rows.filter(pl.col("_removed").is_null())
            .join(safety.drop("key"), on="_k", how="left", maintain_order="left")
            .join(watermark.drop("key"), on="_k", how="left", maintain_order="left")
            .join(aesthetic.drop("key"), on="_k", how="left", maintain_order="left")
            .join(semantic.drop("key"), on="_k", how="left", maintain_order="left"))
    out = rows.lazy().select(
        pl.col("url").alias("URL"), pl.col("caption").alias("TEXT"),
        pl.col("original_width").alias("WIDTH"), pl.col("original_height").alias("HEIGHT"),
        pl.col("language").fill_null("").alias("LANGUAGE"), "similarity", "pwatermark", "punsafe",
        url_text_hash_expr(pl.col("url"), pl.col("caption")).alias("hash"), "aesthetic", "key", "shard", "sha256",
        "phash",
        "language_score", pl.lit(crawl).alias("crawl"),
        subset_expr(pl.col("language")).alias("subset"),
        "duplicate_of", "near_duplicate_of", "semantic_duplicate_of", *added).cast(filtered_dtypes()).collect()
    return out, removed


def write_filtered(store: Storage, crawl: str, bucket: str, layout: paths.Layout, table: pa.Table,
                   report: FilteredBucket) -> FilteredBucket:
    """Store the bucket's rows; the record that names them is what the asset returns."""
    key = paths.filtered_metadata(crawl, bucket, layout)
    store.write_parquet(key, table, **PARQUET_OPTIONS)
    report.file, report.rows = key, table.num_rows
    return report


def _columns(frame: pl.DataFrame | pl.LazyFrame, columns: list[str]) -> pl.DataFrame:
    """Only the columns the join uses: read lazily, the score tables' URL, caption and digest columns (most of
    their bytes) are never decoded."""
    return frame.lazy().select(columns).collect()


def run(store: Storage, crawl: str, bucket: str, layout: paths.Layout, manifest: ShardsManifest,
        scores: pl.DataFrame | pl.LazyFrame, safety: pl.DataFrame | pl.LazyFrame,
        watermark: pl.DataFrame | pl.LazyFrame, language_scores: pl.DataFrame,
        duplicates: pl.DataFrame | pl.LazyFrame, removals: RemovalMatcher | None = None,
        removal_version: str = "", aesthetic: pl.DataFrame | pl.LazyFrame | None = None,
        semantic: pl.DataFrame | pl.LazyFrame | None = None) -> tuple[FilteredBucket, pa.Table]:
    """The filtered metadata's entry point: the bucket's filtered metadata, written; its record and its rows.
    `semantic`: the bucket's rows of the crawl's semantic dedup (None: not run, a null column)."""
    start = time.perf_counter()
    downloads = download_rows(store, manifest)
    scores = _columns(scores, ["key", "model", "similarity", "threshold", "keep"])
    concept = ["concept_filtered"] * ("concept_filtered" in safety.lazy().collect_schema())
    safety = _columns(safety, ["key", "model", "punsafe", *concept])
    aesthetic = _columns(aesthetic, ["key", "model", "aesthetic"]) if aesthetic is not None else None
    watermark = _columns(watermark, ["key", "model", "pwatermark"])
    marks = ["key", "duplicate_of", "near_duplicate_of"]
    duplicates = _columns(duplicates, marks + ["removed"] * ("removed" in duplicates.lazy().collect_schema()))
    semantic = _columns(semantic, ["key", "semantic_duplicate_of"]) if semantic is not None else None
    frame, removed = build_filtered(crawl, bucket, downloads, scores, safety, watermark, language_scores,
                                    duplicates, removals, aesthetic, semantic)
    report = FilteredBucket(crawl=crawl, bucket=bucket, file="", rows=0,
                            downloaded=int((downloads["status"] == "success").sum()),
                            kept=int(scores["keep"].sum()), removed=removed, removal_version=removal_version,
                            subsets={s: int(n) for s, n in frame.group_by("subset").len().sort("subset").iter_rows()},
                            exact_duplicates=int(frame["duplicate_of"].is_not_null().sum()),
                            near_duplicates=int(frame["near_duplicate_of"].is_not_null().sum()),
                            semantic_duplicates=int(frame["semantic_duplicate_of"].is_not_null().sum()))
    report.models = models_used(scores, safety, watermark, aesthetic)
    table = frame.to_arrow()
    write_filtered(store, crawl, bucket, layout, table, report)
    report.seconds = time.perf_counter() - start
    return report, table


def models_used(scores: pl.DataFrame, safety: pl.DataFrame, watermark: pl.DataFrame,
                aesthetic: pl.DataFrame | None = None) -> dict[str, Any]:
    """The models (and CLIP thresholds) whose outputs the columns hold, from the score tables themselves."""
    out: dict[str, Any] = {}
    if scores.height:
        for model, threshold in scores.select("model", "threshold").unique().sort("model").iter_rows():
            out[f"clip:{model}"] = {"threshold": threshold}
    for name, table in (("safety", safety), ("watermark", watermark), ("aesthetic", aesthetic)):
        if table is not None and table.height:
            out[name] = sorted(table["model"].unique().drop_nulls().to_list())
    return out
