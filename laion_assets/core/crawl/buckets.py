"""URL-hash buckets: the shuffle between the parse stage (crawl x chunk) and everything after dedup
(crawl x bucket).

A pair's bucket is `xxh3_64(url) % n_buckets` on the normalized URL: stable across processes, machines
and library versions (unlike Python's `hash` or a dataframe library's internal hash), so a bucket of one
crawl can be compared with the same bucket of an earlier crawl.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from laion_assets.core import paths
from laion_assets.core.paths import Layout


def bucket_of(urls: list[str], n_buckets: int) -> np.ndarray:
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(u.encode()) for u in urls), dtype=np.uint64, count=len(urls))
    return (hashes % np.uint64(n_buckets)).astype(np.int64)


class BucketWriter:
    """Splits tables by URL bucket into one local Parquet file per bucket (all buckets, empty ones too)."""

    def __init__(self, directory: str, layout: Layout, schema: pa.Schema) -> None:
        self.directory = directory
        self.layout = layout
        self.schema = schema
        self._writers: dict[int, pq.ParquetWriter] = {}
        self.rows = [0] * layout.buckets

    def path(self, bucket: int) -> str:
        return os.path.join(self.directory, paths.bucket_file(self.layout.bucket_key(bucket)))

    def _writer(self, bucket: int) -> pq.ParquetWriter:
        w = self._writers.get(bucket)
        if w is None:
            w = self._writers[bucket] = pq.ParquetWriter(self.path(bucket), self.schema, compression="zstd")
        return w

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        buckets = bucket_of(table.column("url").to_pylist(), self.layout.buckets)
        order = np.argsort(buckets, kind="stable")
        table = table.take(pa.array(order))
        counts = np.bincount(buckets, minlength=self.layout.buckets)
        start = 0
        for b in np.flatnonzero(counts):
            n = int(counts[b])
            self._writer(int(b)).write_table(table.slice(start, n))
            self.rows[b] += n
            start += n

    def close(self) -> dict[str, str]:
        """Bucket key -> local file, for every bucket."""
        for b in range(self.layout.buckets):
            self._writer(b)
        for w in self._writers.values():
            w.close()
        return {self.layout.bucket_key(b): self.path(b) for b in range(self.layout.buckets)}
