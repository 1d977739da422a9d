"""Synthetic inputs of the release stage for tests and the benchmark: one bucket's download rows, CLIP scores,
safety, watermark and aesthetic scores and unique pairs, in the stages' own schemas, with planted exact duplicates
(the same sha256 at another URL) and near duplicates (a pHash a few bits away). Vectorised, so that millions of rows
are made in seconds; everything is a pure function of the seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from laion_assets.core.clip.aesthetic import AESTHETIC_SCHEMA
from laion_assets.core.clip.safety import SAFETY_SCHEMA
from laion_assets.core.clip.scores import SCORE_SCHEMA
from laion_assets.core.clip.watermark import WATERMARK_SCHEMA
from laion_assets.core.download.writer import ROW_SCHEMA

if TYPE_CHECKING:
    import polars as pl

LANGUAGES = np.array(["en", "en", "en", "de", "fr", "es", ""])


@dataclass(frozen=True)
class BucketInputs:
    rows: pa.Table  # the download's rows (ROW_SCHEMA)
    scores: pa.Table  # SCORE_SCHEMA
    safety: pa.Table
    watermark: pa.Table
    pairs: pa.Table  # url, text, language, language_score
    aesthetic: pa.Table | None = None  # AESTHETIC_SCHEMA


def _decimal(values: np.ndarray, width: int, prefix: str = "", suffix: str = "") -> pl.Series:
    """Zero-padded decimal strings (polars formats a hundred times faster than numpy's char module)."""
    import polars as pl

    return prefix + pl.Series(values).cast(pl.String).str.zfill(width) + suffix


def _hex(values: np.ndarray, width: int = 16) -> pl.Series:
    """64-bit values as zero-padded hex strings."""
    import polars as pl

    raw = pl.Series(np.ascontiguousarray(values.astype(">u8")).view("S8"), dtype=pl.Binary)
    return raw.bin.encode("hex").str.zfill(width)


def bucket_inputs(n: int, bucket: int, seed: int = 0, duplicate_rate: float = 0.02, near_rate: float = 0.02,
                  fail_rate: float = 0.1, keep_rate: float = 0.6, shared_images: int = 0) -> BucketInputs:
    """A bucket of n URLs. Images `0..shared_images-1` of every bucket have the same bytes (exact duplicates across
    buckets); `duplicate_rate` of the samples copy another sample's bytes, `near_rate` another's pHash with 1-3
    bits flipped."""
    import polars as pl

    rng = np.random.default_rng([seed, bucket])
    idx = np.arange(n)
    keys = _decimal(idx, 9)
    urls = _decimal(idx, 9, f"https://host{bucket}.example/img/", ".jpg")
    texts = _decimal(idx, 1, "a picture number ")
    image_ids = rng.integers(0, 2**63 - 1, n, dtype=np.int64).astype(np.uint64)
    phash = rng.integers(0, 2**63 - 1, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    copies = rng.random(n) < duplicate_rate
    source = rng.integers(0, max(1, n), n)
    image_ids[copies] = image_ids[source[copies]]
    phash[copies] = phash[source[copies]]
    near = (rng.random(n) < near_rate) & ~copies
    flips = np.zeros(n, dtype=np.uint64)
    for _ in range(3):
        flips |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    phash[near] = phash[source[near]] ^ flips[near]
    if shared_images:
        image_ids[:shared_images] = np.arange(shared_images, dtype=np.uint64)
        phash[:shared_images] = np.arange(1, shared_images + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ok = rng.random(n) >= fail_rate
    languages = pl.Series(LANGUAGES[rng.integers(0, len(LANGUAGES), n)])
    frame = pl.DataFrame({
        "key": keys, "url": urls, "caption": texts,
        "status": pl.Series(np.where(ok, "success", "failed_to_download")),
        "error_message": pl.Series([None] * n, dtype=pl.String), "http_status": np.full(n, 200, np.int32),
        "final_url": pl.Series([None] * n, dtype=pl.String), "width": np.full(n, 256, np.int32),
        "height": np.full(n, 256, np.int32),
        "original_width": rng.integers(64, 2048, n).astype(np.int32),
        "original_height": rng.integers(64, 2048, n).astype(np.int32),
        "sha256": _hex(image_ids, 64), "phash": _hex(phash), "language": languages,
        "bytes_downloaded": np.full(n, 30_000, np.int64), "attempts": np.ones(n, np.int32),
        "runs": np.ones(n, np.int32)})
    frame = frame.with_columns(pl.when(pl.col("status") == "success").then(pl.col(c)).alias(c)
                               for c in ("sha256", "phash"))
    rows = frame.to_arrow().cast(ROW_SCHEMA)
    scored = frame.filter(pl.col("status") == "success")
    m = scored.height
    keep = rng.random(m) < keep_rate
    scores = scored.select(
        "key", "url", "caption", "language", "sha256",
        pl.when(pl.col("language") == "en").then(pl.lit("small-clip-en")).otherwise(pl.lit("small-clip-multi"))
        .alias("model"), pl.lit("synthetic").alias("weights"),
        pl.Series("similarity", rng.random(m).astype(np.float32) * 0.5),
        pl.lit(0.2, pl.Float32).alias("threshold"), pl.Series("keep", keep), pl.lit("scored").alias("status"),
        pl.lit(None, pl.String).alias("error_message"))
    kept = scores.filter(pl.col("keep")).select("key")
    k = kept.height
    punsafe, pwatermark = rng.random(k).astype(np.float32), rng.random(k).astype(np.float32)
    safety = kept.with_columns(pl.lit("small-safety").alias("model"), pl.Series("punsafe", punsafe),
                               pl.Series("unsafe", punsafe > 0.5))
    watermark = kept.with_columns(pl.lit("small-watermark").alias("model"), pl.Series("pwatermark", pwatermark),
                                  pl.Series("watermark", pwatermark > 0.8), pl.lit("scored").alias("status"),
                                  pl.lit(None, pl.String).alias("error_message"))
    pairs = frame.select("url", pl.col("caption").alias("text"), "language",
                         pl.Series("language_score", rng.random(n).astype(np.float32)))
    # Drawn last: the other columns stay what they were before aesthetic scores existed.
    aesthetic = kept.with_columns(pl.lit("small-aesthetic").alias("model"),
                                  pl.Series("aesthetic", (1 + 9 * rng.random(k)).astype(np.float32)))
    return BucketInputs(rows, scores.to_arrow().cast(SCORE_SCHEMA), safety.to_arrow().cast(SAFETY_SCHEMA),
                        watermark.to_arrow().cast(WATERMARK_SCHEMA), pairs.to_arrow(),
                        aesthetic.to_arrow().cast(AESTHETIC_SCHEMA))


def bucket_embeddings(inputs: BucketInputs, bucket: int, seed: int = 0, dim: int = 16, semantic_rate: float = 0.05,
                      shared_images: int = 0) -> tuple[np.ndarray, pa.Table]:
    """L2-normalised float16 image embeddings of a bucket's kept samples (sorted by key, as the CLIP stage writes
    them) and their metadata (key, url, caption, language). `semantic_rate` of them are another sample's vector with
    a little noise (cosine about 0.999: planted semantic duplicates); the first `shared_images` samples' images
    (the same bytes in every bucket) get the same vector in every bucket. Drawn from a generator of their own, so
    that the other inputs stay what they were."""
    import polars as pl

    rng = np.random.default_rng([seed, bucket, 7])
    kept = pl.from_arrow(inputs.scores).filter(pl.col("keep")).sort("key")
    assert isinstance(kept, pl.DataFrame)
    k = kept.height
    x = rng.standard_normal((k, dim)).astype(np.float32)
    copies = np.nonzero(rng.random(k) < semantic_rate)[0]
    sources = rng.integers(0, max(1, k), len(copies))
    x[copies] = x[sources] + 0.01 * rng.standard_normal((len(copies), dim)).astype(np.float32)
    if shared_images:
        shared = np.random.default_rng([seed, 7]).standard_normal((shared_images, dim)).astype(np.float32)
        index = kept["key"].str.to_integer(strict=False).to_numpy()
        picked = np.nonzero(index < shared_images)[0]
        x[picked] = shared[index[picked]]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = kept.select("key", "url", "caption", "language").to_arrow()
    return x.astype(np.float16), meta
