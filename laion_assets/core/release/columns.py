"""The release's columns: LAION-5B's names first, then `aesthetic` (LAION-Aesthetics V2's score, which LAION
published as a separate table), then ours, and the 64-bit `hash` of URL and TEXT.

`hash` is xxHash64 (seed 0) of the UTF-8 bytes of `URL + "\\x00" + TEXT`, read as a signed int64 (the bit pattern
of the unsigned digest), as LAION's collections store an int64 hash column for joins. The NUL separator keeps
("ab", "c") and ("a", "bc") apart; xxHash64 is stable across machines and library versions (unlike a dataframe
library's internal hash). In Python: `xxhash.xxh64_intdigest(url.encode() + b"\\x00" + text.encode())`, minus 2**64
when at least 2**63.

The pipeline computes it column-wise with `url_text_hash_expr` (the `polars-hash` plugin's exact xxHash64, in
Rust: a per-row Python call cost more than the rest of the join); `url_text_hash` is the plain-Python reference the
tests hold it to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import xxhash

if TYPE_CHECKING:
    import polars as pl

SUBSETS = ("en", "multi", "nolang")
LAION_COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "LANGUAGE", "similarity", "pwatermark", "punsafe", "hash"]
FILTERED_SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int32()), ("HEIGHT", pa.int32()),
    ("LANGUAGE", pa.string()), ("similarity", pa.float32()), ("pwatermark", pa.float32()), ("punsafe", pa.float32()),
    ("hash", pa.int64()),
    ("aesthetic", pa.float32()),
    ("key", pa.string()), ("shard", pa.string()), ("sha256", pa.string()), ("phash", pa.string()),
    ("language_score", pa.float32()), ("crawl", pa.string()), ("subset", pa.string()),
    ("duplicate_of", pa.string()), ("near_duplicate_of", pa.string()), ("semantic_duplicate_of", pa.string()),
])
SEPARATOR = b"\x00"
# How the filtered metadata and the release parts are written: zstd, with dictionary pages only for the columns of
# few distinct values (dictionary-encoding URLs, captions and digests, which are nearly all distinct, cost half of
# the write time and made the files larger).
DICTIONARY_COLUMNS = ["LANGUAGE", "crawl", "subset", "shard"]
# Min/max statistics only for the numeric columns, which readers filter on (similarity > x, punsafe < y): those of
# URLs, captions and digests prune nothing and cost a fifth of the write.
STATISTICS_COLUMNS = ["WIDTH", "HEIGHT", "similarity", "pwatermark", "punsafe", "hash", "language_score", "aesthetic"]
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": DICTIONARY_COLUMNS,
                   "write_statistics": STATISTICS_COLUMNS}


def filtered_dtypes() -> dict[str, pl.DataType]:
    """FILTERED_SCHEMA as polars dtypes, for casting a frame without a round trip through Arrow."""
    import polars as pl

    return dict(pl.from_arrow(FILTERED_SCHEMA.empty_table()).schema)


def url_text_hash_expr(url: pl.Expr, text: pl.Expr) -> pl.Expr:
    """The `hash` column as a polars expression (Int64): xxHash64 of URL, NUL, TEXT, with a missing value hashed as
    the empty string, exactly as `url_text_hash`."""
    import polars as pl
    import polars_hash  # noqa: F401  (registers the `nchash` expression namespace)

    joined = pl.concat_str([url.fill_null(""), pl.lit(SEPARATOR.decode()), text.fill_null("")])
    # The plugin returns the unsigned digest; the release stores its bit pattern as a signed int64.
    return joined.nchash.xxhash64().reinterpret(signed=True)


def url_text_hash(urls: list[str | None], texts: list[str | None]) -> np.ndarray:
    """The `hash` column, one Python call per row: xxHash64 of URL, NUL, TEXT as int64 (a missing value hashes as
    the empty string). The reference for `url_text_hash_expr`."""
    digests = np.fromiter(
        (xxhash.xxh64_intdigest((u or "").encode() + SEPARATOR + (t or "").encode())
         for u, t in zip(urls, texts, strict=True)), dtype=np.uint64, count=len(urls))
    return digests.view(np.int64)


def subset_of(language: str | None) -> str:
    """LAION-5B's split: laion2B-en (English), laion2B-multi (another detected language), laion1B-nolang (none)."""
    if not language:
        return "nolang"
    return "en" if language == "en" else "multi"


def subset_expr(language: pl.Expr) -> pl.Expr:
    """subset_of as a polars expression."""
    import polars as pl

    return (pl.when(language.is_null() | (language == "")).then(pl.lit("nolang"))
            .when(language == "en").then(pl.lit("en")).otherwise(pl.lit("multi")))


def sample_id(crawl: str, bucket: str, key: str) -> str:
    """A sample's name across crawls (keys repeat between buckets): what duplicate_of and near_duplicate_of hold.
    Sorting these names sorts samples by crawl, then bucket, then key: the order in which duplicates are won."""
    return f"{crawl}/{bucket}/{key}"
