"""Image dedup across a whole crawl and against earlier crawls: exact (sha256 of the image bytes) and near (pHash
within a Hamming radius), with winners that do not depend on the order in which buckets ran.

The winner rule: samples are ordered by `sample_id` (crawl, then bucket, then key; earlier crawls sort first), and
a sample is a duplicate of the first sample in that order with the same sha256 (`duplicate_of`), or a near
duplicate of the first sample in that order whose pHash is within the radius of its own (`near_duplicate_of`).
Near duplicates are looked for among the samples that are not exact duplicates.

Near duplicates are found with multi-index hashing, never by comparing all pairs: the 64 pHash bits are cut into
`radius + 3` blocks, and two hashes within `radius` bits differ in at most `radius` blocks, so they agree exactly
on at least 3 blocks (the pigeonhole principle). Each choice of 3 blocks is a key (35 keys for radius 4, each of
about 27 bits); hashes that share a key are candidates, and only candidates are compared. With keys of 27 bits,
random candidates are rare until hundreds of millions of distinct hashes, so the work grows with the number of
samples, not its square. Identical pHashes are collapsed first, so a popular picture costs one entry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

MATCHED_BLOCKS = 3
DEDUP_COLUMNS = ["sample_id", "sha256", "phash"]


@dataclass(frozen=True)
class DedupCounts:
    samples: int
    exact_duplicates: int
    near_duplicates: int


def block_masks(radius: int, bits: int = 64) -> list[int]:
    """The bit masks of the radius + 3 blocks of a `bits`-bit hash (as even as the bits allow)."""
    blocks = min(bits, radius + MATCHED_BLOCKS)
    edges = [round(i * bits / blocks) for i in range(blocks + 1)]
    return [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:], strict=False)]


def key_masks(radius: int) -> list[int]:
    """One mask per choice of MATCHED_BLOCKS blocks: hashes within `radius` share at least one masked value."""
    masks = block_masks(radius)
    if len(masks) <= MATCHED_BLOCKS:
        return [sum(masks)]
    return [sum(combo) for combo in itertools.combinations(masks, MATCHED_BLOCKS)]


def near_pairs(hashes: pl.DataFrame, radius: int) -> pl.DataFrame:
    """Pairs (h, other) of distinct hashes within `radius` bits, both ways round. `hashes`: a column `h` (UInt64) of
    distinct values."""
    import polars as pl

    found = []
    base = hashes.select("h")
    for mask in key_masks(radius):
        keyed = base.with_columns((pl.col("h") & pl.lit(mask, dtype=pl.UInt64)).alias("k"))
        # Only keys shared by two or more hashes can give a pair: the rest never reach the join.
        shared = keyed.filter(pl.len().over("k") > 1)
        if shared.is_empty():
            continue
        pairs = (shared.join(shared, on="k", suffix="_o")
                 .filter(pl.col("h") != pl.col("h_o"))
                 .filter((pl.col("h") ^ pl.col("h_o")).bitwise_count_ones() <= radius)
                 .select("h", pl.col("h_o").alias("other")))
        found.append(pairs)
    if not found:
        return pl.DataFrame(schema={"h": pl.UInt64, "other": pl.UInt64})
    return pl.concat(found).unique()


def mark_duplicates(samples: pl.DataFrame, radius: int) -> tuple[pl.DataFrame, DedupCounts]:
    """`samples` (sample_id, sha256, phash hex) with `duplicate_of` and `near_duplicate_of` added, sorted by
    sample_id. A missing sha256 or pHash matches nothing."""
    import polars as pl

    if radius < 0:
        raise ValueError(f"the near-duplicate radius must be 0 or more, not {radius}")
    # Samples are handled by their rank in sample_id order (integers, not names, in every group and join: the
    # names' windows and joins were most of the memory); names are looked up by rank at the end.
    df = samples.select(DEDUP_COLUMNS).sort("sample_id").with_row_index("rank")
    first_bytes = (df.filter(pl.col("sha256").is_not_null()).group_by("sha256")
                   .agg(pl.col("rank").min().alias("first_bytes")))
    df = (df.join(first_bytes, on="sha256", how="left", maintain_order="left")
          .with_columns(pl.when(pl.col("first_bytes") < pl.col("rank")).then(pl.col("first_bytes"))
                        .alias("duplicate_rank")).drop("first_bytes"))
    candidates = (df.filter(pl.col("duplicate_rank").is_null() & pl.col("phash").is_not_null())
                  .with_columns(pl.col("phash").str.to_integer(base=16, dtype=pl.UInt64, strict=False).alias("h"))
                  .filter(pl.col("h").is_not_null()))
    # The earliest sample of each distinct hash, and for each hash the earliest sample of any hash near it.
    firsts = candidates.group_by("h").agg(pl.col("rank").min().alias("first"))
    pairs = near_pairs(firsts.select("h"), radius)
    nearest = (pairs.join(firsts.rename({"h": "other", "first": "other_first"}), on="other")
               .group_by("h").agg(pl.col("other_first").min()))
    marked = (candidates.join(firsts, on="h").join(nearest, on="h", how="left")
              .with_columns(pl.min_horizontal(
                  pl.when(pl.col("first") < pl.col("rank")).then(pl.col("first")),
                  pl.when(pl.col("other_first") < pl.col("rank")).then(pl.col("other_first"))).alias("near_rank"))
              .filter(pl.col("near_rank").is_not_null())
              .select("rank", "near_rank"))
    out = df.join(marked, on="rank", how="left", maintain_order="left")
    names = out["sample_id"]  # in rank order: the name of rank r is at position r
    out = out.select("sample_id", "sha256", "phash", names.gather(out["duplicate_rank"]).alias("duplicate_of"),
                     names.gather(out["near_rank"]).alias("near_duplicate_of"))
    counts = DedupCounts(samples=out.height, exact_duplicates=int(out["duplicate_of"].is_not_null().sum()),
                         near_duplicates=int(out["near_duplicate_of"].is_not_null().sum()))
    return out, counts
