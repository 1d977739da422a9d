"""Partitions: a dynamic one per crawl, crawl x chunk for the parse stage, crawl x bucket after dedup.

Chunk and bucket counts are fixed when the code location loads (partition keys must be), from
`LAION_ASSETS_CHUNKS` / `LAION_ASSETS_BUCKETS` (`core.paths.Layout`); production uses e.g. 512 and 256.
"""

from __future__ import annotations

import warnings

import dagster as dg

from laion_assets.core.paths import Layout

crawl_partitions = dg.DynamicPartitionsDefinition(name="crawls")


def chunk_partitions(layout: Layout) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {"crawl": crawl_partitions, "chunk": dg.StaticPartitionsDefinition(layout.chunk_keys())})


def bucket_partitions(layout: Layout) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {"crawl": crawl_partitions, "bucket": dg.StaticPartitionsDefinition(layout.bucket_keys())})


def crawl_of(context: dg.AssetExecutionContext) -> str:
    key = context.partition_key
    if isinstance(key, dg.MultiPartitionKey):
        return key.keys_by_dimension["crawl"]
    return key


def dimension(context: dg.AssetExecutionContext, name: str) -> str:
    key = context.partition_key
    assert isinstance(key, dg.MultiPartitionKey)
    return key.keys_by_dimension[name]


def crawl_and_bucket(context: dg.AssetExecutionContext) -> tuple[str, str]:
    return crawl_of(context), dimension(context, "bucket")


# chunk -> bucket is all-to-all within one crawl: the shuffle through storage. (Both mappings are
# marked beta in Dagster 1.13; the STYLE note verified them with crawl x chunk / crawl x bucket.)
warnings.filterwarnings("ignore", category=dg.BetaWarning, module=__name__)
chunks_to_buckets = dg.MultiPartitionMapping(
    {
        "crawl": dg.DimensionPartitionMapping("crawl", dg.IdentityPartitionMapping()),
        "chunk": dg.DimensionPartitionMapping("bucket", dg.AllPartitionMapping()),
    }
)
# A crawl-level asset reads every chunk or bucket of its crawl; a chunk- or bucket-level one reads its crawl's
# crawl-level output.
to_crawl = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="crawl")
