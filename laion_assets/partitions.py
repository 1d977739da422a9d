"""Partitions: a dynamic one per crawl, crawl x chunk for the parse stage, crawl x bucket after dedup.

Chunk and bucket counts are fixed when the code location loads (partition keys must be), from
`LAION_ASSETS_CHUNKS` / `LAION_ASSETS_BUCKETS`; production uses e.g. 512 and 256.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import dagster as dg

from laion_assets.core.buckets import bucket_key, chunk_key

crawl_partitions = dg.DynamicPartitionsDefinition(name="crawls")


@dataclass(frozen=True)
class Layout:
    chunks: int = 4
    buckets: int = 4

    @classmethod
    def from_env(cls) -> Layout:
        return cls(
            chunks=int(os.environ.get("LAION_ASSETS_CHUNKS", cls.chunks)),
            buckets=int(os.environ.get("LAION_ASSETS_BUCKETS", cls.buckets)),
        )

    def chunk_keys(self) -> list[str]:
        return [chunk_key(i, self.chunks) for i in range(self.chunks)]

    def bucket_keys(self) -> list[str]:
        return [bucket_key(i, self.buckets) for i in range(self.buckets)]

    def chunk_partitions(self) -> dg.MultiPartitionsDefinition:
        return dg.MultiPartitionsDefinition(
            {"crawl": crawl_partitions, "chunk": dg.StaticPartitionsDefinition(self.chunk_keys())}
        )

    def bucket_partitions(self) -> dg.MultiPartitionsDefinition:
        return dg.MultiPartitionsDefinition(
            {"crawl": crawl_partitions, "bucket": dg.StaticPartitionsDefinition(self.bucket_keys())}
        )


def crawl_of(context: dg.AssetExecutionContext) -> str:
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        return key.keys_by_dimension["crawl"]
    return key


def dimension(context: dg.AssetExecutionContext, name: str) -> str:
    key = context.partition_key
    assert isinstance(key, dg.MultiPartitionKey)
    return key.keys_by_dimension[name]


# chunk -> bucket is all-to-all within one crawl: the shuffle through storage. (Both mappings are
# marked beta in Dagster 1.13; the STYLE note verified them with crawl x chunk / crawl x bucket.)
warnings.filterwarnings("ignore", category=dg.BetaWarning, module=__name__)
chunks_to_buckets = dg.MultiPartitionMapping(
    {
        "crawl": dg.DimensionPartitionMapping("crawl", dg.IdentityPartitionMapping()),
        "chunk": dg.DimensionPartitionMapping("bucket", dg.AllPartitionMapping()),
    }
)
chunk_to_crawl = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="crawl")
