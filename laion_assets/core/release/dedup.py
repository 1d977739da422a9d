"""Image dedup across a whole crawl and against earlier crawls: exact (sha256 of the image bytes) and near (pHash
within a Hamming radius), with winners that do not depend on the order in which buckets ran, in memory bounded by a
partition size rather than by the number of samples.

The winner rule: samples are ordered by crawl, then bucket, then key (the order of their `crawl/bucket/key`
names); a sample is a duplicate of the first sample in that order with the same sha256 (`duplicate_of`), or a near
duplicate of the first sample in that order whose pHash is within the radius of its own (`near_duplicate_of`).
Near duplicates are looked for among the samples that are not exact duplicates. Two sha256 digests are taken as
the same when their first 128 bits are (a collision there is as unlikely as one of the whole digest).

Each sample is handled as a 64-bit id, its source's rank among the sorted (crawl, bucket) pairs shifted left by
SOURCE_SHIFT bits plus its rank in its source's key order: comparing ids compares names, and names are looked up
only for the few samples that win something.

Near duplicates are found with multi-index hashing, never by comparing all pairs: the 64 pHash bits are cut into
`radius + 3` blocks, and two hashes within `radius` bits differ in at most `radius` blocks, so they agree exactly
on at least 3 blocks (the pigeonhole principle). Each choice of 3 blocks is a key (35 keys for radius 4, each of
about 27 bits); hashes that share a key are candidates, and only candidates are compared. With keys of 27 bits,
random candidates are rare until hundreds of millions of distinct hashes, so the work grows with the number of
samples, not its square. Identical pHashes are collapsed first, so a popular picture costs one entry.

Bounded memory: samples are spilled to Arrow IPC files in 2^b partitions, by the top bits of a hash of the sha256
for the exact step and by the top bits of one pHash block for the near step. The keys whose first block is j are
searched within partitions by block j's bits (two hashes sharing such a key share those bits), so the distinct
hashes are re-partitioned once per block that starts a key (5 times for radius 4), not once per key. What stays in
memory is one partition, one source, and the marks (16 bytes per duplicate found).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

MATCHED_BLOCKS = 3
SOURCE_SHIFT = 40  # a source (crawl x bucket) holds at most 2^40 samples
DEDUP_COLUMNS = ["sample_id", "sha256", "phash"]
PARTITION_ROWS = 1_000_000  # rows of one spilled partition the dedup aims at (what it holds at once)
SPREAD_SEED = 20261123  # polars' string hash spreads digests over the exact step's partitions


@dataclass(frozen=True)
class DedupCounts:
    samples: int
    exact_duplicates: int
    near_duplicates: int


def block_edges(radius: int, bits: int = 64) -> list[tuple[int, int]]:
    """The (low bit, high bit) of each of the radius + 3 blocks of a `bits`-bit hash (as even as the bits allow),
    the first block holding the top bits."""
    blocks = min(bits, radius + MATCHED_BLOCKS)
    edges = [round(i * bits / blocks) for i in range(blocks + 1)]
    return [(bits - hi, bits - lo) for lo, hi in zip(edges, edges[1:], strict=False)]


def block_masks(radius: int, bits: int = 64) -> list[int]:
    """The bit masks of the radius + 3 blocks of a `bits`-bit hash."""
    return [((1 << (hi - lo)) - 1) << lo for lo, hi in block_edges(radius, bits)]


def key_groups(radius: int) -> list[tuple[int, list[int]]]:
    """The keys (one mask per choice of MATCHED_BLOCKS blocks; hashes within `radius` share at least one masked
    value) grouped by the first block they contain: [(block, [masks])]."""
    masks = block_masks(radius)
    if len(masks) <= MATCHED_BLOCKS:
        return [(0, [sum(masks)])]
    groups: dict[int, list[int]] = {}
    for combo in itertools.combinations(range(len(masks)), MATCHED_BLOCKS):
        groups.setdefault(combo[0], []).append(sum(masks[i] for i in combo))
    return sorted(groups.items())


def key_masks(radius: int) -> list[int]:
    """Every key's mask."""
    return [m for _, masks in key_groups(radius) for m in masks]


def near_pairs(hashes: pl.DataFrame, radius: int, masks: list[int] | None = None) -> pl.DataFrame:
    """Pairs (h, other) of distinct hashes within `radius` bits that share one of `masks`' keys (default: every
    key, which finds them all), both ways round. `hashes`: a column `h` (UInt64) of distinct values."""
    import polars as pl

    found = []
    base = hashes.select("h")
    for mask in key_masks(radius) if masks is None else masks:
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


class Spill:
    """Rows routed to 2^bits partitions by a UInt64 column `part`, buffered in memory up to `buffer_rows` rows in
    all, then appended to one Arrow IPC file per partition and flush. With nothing flushed, a partition is read back
    from memory."""

    def __init__(self, folder: str, bits: int, buffer_rows: int) -> None:
        self.folder, self.partitions, self.buffer_rows = folder, 1 << bits, buffer_rows
        self.buffers: dict[int, list[pl.DataFrame]] = {}
        self.buffered = 0
        self.files: dict[int, list[str]] = {}
        os.makedirs(folder, exist_ok=True)

    def add(self, frame: pl.DataFrame) -> None:
        """Route `frame`'s rows by its `part` column (dropped)."""
        if frame.is_empty():
            return
        if self.partitions == 1:
            self._buffer(0, frame.drop("part"))
        else:
            for (part,), rows in frame.partition_by("part", as_dict=True, include_key=False).items():
                self._buffer(int(part), rows)
        if self.buffered > self.buffer_rows:
            self.flush()

    def _buffer(self, part: int, rows: pl.DataFrame) -> None:
        self.buffers.setdefault(part, []).append(rows)
        self.buffered += rows.height

    def flush(self) -> None:
        import polars as pl

        for part, frames in self.buffers.items():
            files = self.files.setdefault(part, [])
            path = os.path.join(self.folder, f"{part:06d}-{len(files):06d}.arrow")
            pl.concat(frames).write_ipc(path, compression="uncompressed")
            files.append(path)
        self.buffers, self.buffered = {}, 0

    def read(self, part: int) -> pl.DataFrame | None:
        import polars as pl

        frames = [pl.read_ipc(p) for p in self.files.get(part, [])] + self.buffers.get(part, [])
        return pl.concat(frames) if frames else None

    def __iter__(self) -> Iterator[pl.DataFrame]:
        """Each non-empty partition in turn; its files are deleted once read."""
        for part in range(self.partitions):
            frame = self.read(part)
            self.buffers.pop(part, None)
            for path in self.files.pop(part, []):
                os.unlink(path)
            if frame is not None:
                yield frame


def _top_bits(column: str, lo: int, hi: int, bits: int) -> pl.Expr:
    """The partition of a hash: `bits` top bits of its bits [lo, hi)."""
    import polars as pl

    if bits == 0:
        return pl.lit(0, dtype=pl.UInt64).alias("part")
    # Polars has no shift operator: floor division by a power of two is the shift.
    return ((pl.col(column) // pl.lit(1 << (hi - bits), dtype=pl.UInt64)) & ((1 << bits) - 1)).alias("part")


class ImageDeduper:
    """The dedup of many sources, each added once (in any order), with memory bounded by `partition_rows`.

    `sources`: every (crawl, bucket) that will be added, which fixes the order of samples; `expected_rows`: about
    how many samples will be added in all (sizes the partitions)."""

    def __init__(self, sources: list[tuple[str, str]], radius: int, work: str, expected_rows: int,
                 partition_rows: int = PARTITION_ROWS) -> None:
        if radius < 0:
            raise ValueError(f"the near-duplicate radius must be 0 or more, not {radius}")
        self.sources = sorted(set(sources))
        self.ordinal = {s: i for i, s in enumerate(self.sources)}
        self.radius, self.work, self.partition_rows = radius, work, partition_rows
        self.blocks = block_edges(radius)
        narrowest = min(hi - lo for lo, hi in self.blocks)
        self.bits = min(narrowest, max(0, math.ceil(math.log2(max(1, expected_rows) / partition_rows))))
        self.exact = Spill(os.path.join(work, "exact"), self.bits, partition_rows)
        self.near = Spill(os.path.join(work, "near"), self.bits, partition_rows)
        self.added: set[int] = set()

    def add(self, crawl: str, bucket: str, samples: pl.DataFrame) -> pl.DataFrame:
        """Add a source: `samples` (key, sha256, phash, competes: whether it may win or be marked; a removed sample
        does not). Returns them sorted by key with their `sid`."""
        import polars as pl

        source = self.ordinal[(crawl, bucket)]
        if source in self.added:
            raise ValueError(f"{crawl}/{bucket} was added twice")
        self.added.add(source)
        ordered = (samples.sort("key").with_row_index("sid")
                   .with_columns((pl.col("sid").cast(pl.UInt64) + (source << SOURCE_SHIFT)).alias("sid")))
        ordered.select("key").write_ipc(self._keys_file(source), compression="uncompressed")
        competing = (ordered.filter(pl.col("competes"))
                     .select("sid", "sha256",
                             pl.col("phash").str.to_integer(base=16, dtype=pl.UInt64, strict=False).alias("h")))
        # Partitioned by a hash of the digest, not its own bits: digests other tools made need not be uniform.
        with_bytes = competing.filter(pl.col("sha256").is_not_null()).with_columns(
            pl.col("sha256").hash(seed=SPREAD_SEED).alias("spread"))
        self.exact.add(with_bytes.with_columns(_top_bits("spread", 0, 64, self.bits)).drop("spread"))
        no_bytes = competing.filter(pl.col("sha256").is_null() & pl.col("h").is_not_null())
        self.near.add(self._by_block(no_bytes.select("h", "sid"), 0))
        return ordered

    def _keys_file(self, source: int) -> str:
        os.makedirs(os.path.join(self.work, "keys"), exist_ok=True)
        return os.path.join(self.work, "keys", f"{source:08d}.arrow")

    def _by_block(self, frame: pl.DataFrame, block: int) -> pl.DataFrame:
        lo, hi = self.blocks[block]
        return frame.with_columns(_top_bits("h", lo, hi, self.bits))

    def finish(self) -> pl.DataFrame:
        """The marks: sid, duplicate_of, near_duplicate_of (sids), one row per sample marked either way."""
        import polars as pl

        exact_marks = []
        for rows in self.exact:
            first = rows.group_by("sha256").agg(pl.col("sid").min().alias("first"))
            rows = rows.join(first, on="sha256")
            exact_marks.append(rows.filter(pl.col("sid") != pl.col("first"))
                               .select("sid", pl.col("first").alias("duplicate_of")))
            winners = rows.filter((pl.col("sid") == pl.col("first")) & pl.col("h").is_not_null())
            self.near.add(self._by_block(winners.select("h", "sid"), 0))
        near_marks = self._near_marks()
        schema = {"sid": pl.UInt64, "duplicate_of": pl.UInt64, "near_duplicate_of": pl.UInt64}
        return pl.concat([pl.DataFrame(schema=schema), *exact_marks, near_marks], how="diagonal")

    def _near_marks(self) -> pl.DataFrame:
        import polars as pl

        # The earliest sample of each distinct hash, partitioned by the top bits of block 0, as the candidates.
        candidates = Spill(os.path.join(self.work, "candidates"), self.bits, self.partition_rows)
        firsts = Spill(os.path.join(self.work, "firsts"), self.bits, self.partition_rows)
        for rows in self.near:
            first = rows.group_by("h").agg(pl.col("sid").min().alias("first"))
            candidates.add(self._by_block(rows, 0))
            firsts.add(self._by_block(first, 0))
        firsts.flush()
        pairs = []
        for block, masks in key_groups(self.radius):
            partitions: Spill = firsts
            if block:
                # Re-partitioned by this block's bits: hashes that share a key containing it share those bits.
                partitions = Spill(os.path.join(self.work, f"block-{block}"), self.bits, self.partition_rows)
                for part in range(firsts.partitions):
                    rows = firsts.read(part)
                    if rows is not None:
                        partitions.add(self._by_block(rows.select("h"), block))
                partitions.flush()
            for part in range(partitions.partitions):
                rows = partitions.read(part)
                if rows is not None:
                    pairs.append(near_pairs(rows.select("h"), self.radius, masks))
            if block:
                list(partitions)  # deletes its files
        found = pl.concat([pl.DataFrame(schema={"h": pl.UInt64, "other": pl.UInt64}), *pairs]).unique()
        # For each hash, the earliest sample of any hash near it (the pairs are few: one per near duplicate).
        nearest_parts = []
        for part in range(firsts.partitions):
            rows = firsts.read(part)
            if rows is not None and found.height:
                nearest_parts.append(found.join(rows.rename({"h": "other", "first": "other_first"}), on="other")
                                     .select("h", "other_first"))
        nearest = (pl.concat([pl.DataFrame(schema={"h": pl.UInt64, "other_first": pl.UInt64}), *nearest_parts])
                   .group_by("h").agg(pl.col("other_first").min()))
        marks = []
        for part in range(firsts.partitions):
            rows = candidates.read(part)
            if rows is None:
                continue
            marked = (rows.join(firsts.read(part), on="h").join(nearest, on="h", how="left")
                      .with_columns(pl.min_horizontal(
                          pl.when(pl.col("first") < pl.col("sid")).then(pl.col("first")),
                          pl.when(pl.col("other_first") < pl.col("sid")).then(pl.col("other_first")))
                          .alias("near_duplicate_of"))
                      .filter(pl.col("near_duplicate_of").is_not_null()).select("sid", "near_duplicate_of"))
            marks.append(marked)
        list(candidates), list(firsts)  # deletes their files
        return pl.concat([pl.DataFrame(schema={"sid": pl.UInt64, "near_duplicate_of": pl.UInt64}), *marks])

    def names(self, sids: pl.Series) -> pl.DataFrame:
        """sid -> `crawl/bucket/key` for the given sids (those that won something: few)."""
        return sample_names(sids, self.sources, self._keys_file)


def mark_duplicates(samples: pl.DataFrame, radius: int, work: str | None = None,
                    partition_rows: int = PARTITION_ROWS) -> tuple[pl.DataFrame, DedupCounts]:
    """`samples` (sample_id `crawl/bucket/key`, sha256, phash hex) with `duplicate_of` and `near_duplicate_of`
    added, sorted by sample_id: the whole dedup on one table (tests, small inputs). A missing sha256 or pHash
    matches nothing."""
    import tempfile

    import polars as pl

    if radius < 0:
        raise ValueError(f"the near-duplicate radius must be 0 or more, not {radius}")
    parts = samples.select(DEDUP_COLUMNS).with_columns(
        pl.col("sample_id").str.splitn("/", 3).struct.rename_fields(["crawl", "bucket", "key"]).alias("_id")
    ).unnest("_id")
    sources = parts.select("crawl", "bucket").unique().rows()
    with tempfile.TemporaryDirectory(prefix="laion-dedup-", dir=work) as tmp:
        deduper = ImageDeduper(sources, radius, tmp, samples.height, partition_rows)
        ordered = [deduper.add(crawl, bucket, rows.with_columns(pl.lit(True).alias("competes")))
                   for (crawl, bucket), rows in parts.partition_by("crawl", "bucket", as_dict=True).items()]
        marks = deduper.finish()
        names = deduper.names(pl.concat([marks["duplicate_of"], marks["near_duplicate_of"]]))
    out = (pl.concat(ordered).join(marks, on="sid", how="left")
           .join(names.rename({"sid": "duplicate_of", "name": "dup"}), on="duplicate_of", how="left")
           .join(names.rename({"sid": "near_duplicate_of", "name": "near"}), on="near_duplicate_of", how="left")
           .sort("sid")
           .select("sample_id", "sha256", "phash", pl.col("dup").alias("duplicate_of"),
                   pl.col("near").alias("near_duplicate_of")))
    counts = DedupCounts(samples=out.height, exact_duplicates=int(out["duplicate_of"].is_not_null().sum()),
                         near_duplicates=int(out["near_duplicate_of"].is_not_null().sum()))
    return out, counts


def sample_names(sids: pl.Series, sources: list[tuple[str, str]], keys_file: Callable[[int], str]) -> pl.DataFrame:
    """sid -> `crawl/bucket/key` for the given sids, from each source's spilled keys (`keys_file(source)`, in the
    key order that ranks were given in): only the sources the sids name are read."""
    import polars as pl

    wanted = pl.DataFrame({"sid": sids.unique().drop_nulls()}).with_columns(
        (pl.col("sid") // (1 << SOURCE_SHIFT)).alias("source"),
        (pl.col("sid") % (1 << SOURCE_SHIFT)).alias("rank"))
    out = [pl.DataFrame(schema={"sid": pl.UInt64, "name": pl.String})]
    for (source,), rows in wanted.partition_by("source", as_dict=True).items():
        crawl, bucket = sources[int(source)]
        keys = pl.read_ipc(keys_file(int(source)))["key"]
        out.append(rows.select("sid", (f"{crawl}/{bucket}/" + keys.gather(rows["rank"])).alias("name")))
    return pl.concat(out)
