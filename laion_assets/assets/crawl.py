"""The Common Crawl stage: WAT manifest -> candidate pairs -> unique pairs.

Outputs go through the IO manager: the WAT manifest and the unique pairs are tables; candidate pairs, whose
bulk files are split by bucket, return the chunk's record of them (its completion marker), which the dedup of
each bucket receives for every chunk of its crawl through the chunk -> bucket partition mapping.
"""

import warnings

import dagster as dg
import polars as pl
import pyarrow as pa

from laion_assets import k8s, tags
from laion_assets.assets import checks
from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.automation import REPROCESS
from laion_assets.config import config_class
from laion_assets.core.crawl import dedup, extract, manifest, url_list
from laion_assets.core.crawl.candidates import SCHEMA as PAIR_SCHEMA
from laion_assets.core.crawl.extract import ChunkOutput
from laion_assets.core.paths import Layout
from laion_assets.core.settings import ExtractSettings, OperationsSettings, build
from laion_assets.io_manager import stored_key
from laion_assets.partitions import (
    bucket_partitions,
    chunk_partitions,
    chunks_to_buckets,
    crawl_and_bucket,
    crawl_of,
    crawl_partitions,
    dimension,
    to_crawl,
)
from laion_assets.resources import CrawlSourceResource, StorageResource

CODE_VERSION = "2"
# One run for a backfill of many crawls' manifests is what the policy is for; Dagster 1.13 marks it beta.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")
PREVIEW_COLUMNS = ["url", "text", "language", "language_score", "page_url"]
MANIFEST_SCHEMA = pa.schema([("chunk", pa.string()), ("position", pa.int64()), ("path", pa.string())])
UNIQUE_SCHEMA = pa.schema([*PAIR_SCHEMA, pa.field("occurrences", pa.int32())])
ExtractConfig = config_class("ExtractConfig", ExtractSettings)
UNIQUE_PAIRS = dg.AssetKey("unique_pairs")


def network_retries(ops: OperationsSettings) -> dg.RetryPolicy:
    """For steps that read the network: a failed step is retried in its run, with growing delays."""
    return dg.RetryPolicy(max_retries=ops.max_retries, delay=ops.retry_delay_s, backoff=dg.Backoff.EXPONENTIAL)


def wat_manifest_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"parquet"}, group_name="crawl", code_version=CODE_VERSION,
              tags=tags.stage("parse"), backfill_policy=dg.BackfillPolicy.single_run(),
              retry_policy=network_retries(ops),
              check_specs=[checks.spec("wat_manifest", "schema", "chunk, position, path")])
    def wat_manifest(context: dg.AssetExecutionContext, crawl_source: CrawlSourceResource, storage: StorageResource):
        """The crawl's `wat.paths.gz`, split into deterministic contiguous chunks (a URL list's files, for a list
        registered as list-NAME). A backfill of many crawls runs once for all of them."""
        tables = {}
        for crawl in context.partition_keys:
            if url_list.is_list(crawl):
                tables[crawl] = url_list.manifest(storage.get(), crawl, layout)
                continue
            tables[crawl] = manifest.run(crawl, crawl_source.settings(), layout, crawl_source.s3_client())
            context.log.info(f"{crawl}: {tables[crawl].num_rows} WAT files in {layout.chunks} chunks")
        first = next(iter(tables.values()))
        sizes = [hi - lo for lo, hi in manifest.chunk_slices(first.num_rows, layout.chunks)]
        return dg.MaterializeResult(
            value=tables if len(tables) > 1 else first,
            metadata={"crawls": len(tables), "wat_files": sum(t.num_rows for t in tables.values()),
                      "chunks": layout.chunks, "files_per_chunk_min": min(sizes), "files_per_chunk_max": max(sizes),
                      "source": crawl_source.base, "first_paths": dg.MetadataValue.json(first["path"][:5].to_pylist())},
            check_results=[checks.schema("wat_manifest", first.schema, MANIFEST_SCHEMA)])

    return wat_manifest


def candidate_pairs_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=chunk_partitions(layout), kinds={"parquet"}, group_name="crawl",
              tags=tags.stage("parse"), op_tags=k8s.cpu_pod(cpu="1", memory="4Gi"),
              code_version=CODE_VERSION, retry_policy=network_retries(ops), automation_condition=REPROCESS,
              ins={"wat_manifest": dg.AssetIn(partition_mapping=to_crawl)})
    def candidate_pairs(context: dg.AssetExecutionContext, config: ExtractConfig, storage: StorageResource,
                        crawl_source: CrawlSourceResource, wat_manifest: pa.Table):
        """(image URL, alt text, language) pairs of the chunk's WAT files, split by URL-hash bucket; returns the
        chunk's record of its bucket files."""
        crawl, chunk = crawl_of(context), dimension(context, "chunk")
        wat_paths = manifest.chunk_paths(wat_manifest, chunk)
        context.log.info(f"{crawl} chunk {chunk}: {len(wat_paths)} WAT files")
        settings, source = build(ExtractSettings, config), crawl_source.settings()
        if url_list.is_list(crawl):  # a URL list: its rows into the same buckets, instead of the WAT extraction
            target = extract.ChunkTarget(storage.get(), crawl, chunk, layout)
            report = url_list.run(storage.get(), crawl, wat_paths, target, settings)
            metadata = to_metadata(report.metadata())
            metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS)
            metadata["dagster/row_count"] = report.counts.pairs
            return dg.MaterializeResult(value=report.output, metadata=metadata)
        report = extract.run(extract.chunk_locations(wat_paths, source), crawl,
                             extract.ChunkTarget(storage.get(), crawl, chunk, layout), settings, source,
                             crawl_source.s3_client(),
                             lambda done, name: context.log.info(f"[{done}/{len(wat_paths)}] {name}"))
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS)
        metadata["dagster/row_count"] = report.counts.pairs
        if report.failed_files and settings.fail_on_unreadable_wat:
            raise dg.Failure(f"{len(report.failed_files)} WAT file(s) unreadable after retries (the other files'"
                             f" pairs are written): {report.failed_files[:3]}", metadata=metadata)
        return dg.MaterializeResult(value=report.output, metadata=metadata)

    return candidate_pairs


def unique_pairs_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), kinds={"parquet", "polars"}, group_name="crawl",
              tags=tags.stage("dedup", cross_crawl_dedup="url"), op_tags=k8s.cpu_pod(memory="48Gi"),
              code_version=CODE_VERSION, automation_condition=REPROCESS,
              ins={"candidate_pairs": dg.AssetIn(partition_mapping=chunks_to_buckets)},
              check_specs=[checks.spec("unique_pairs", "schema", "the pair columns and occurrences")])
    def unique_pairs(context: dg.AssetExecutionContext, storage: StorageResource,
                     candidate_pairs: dict[str, ChunkOutput]):
        """Pairs with exact duplicate URLs removed, within the crawl and against earlier crawls' same bucket. Earlier
        crawls must have deduplicated this bucket first (backfill crawls in order)."""
        crawl, bucket = crawl_and_bucket(context)
        registered = context.instance.get_dynamic_partitions(crawl_partitions.name)
        earlier = url_list.compared_crawls(crawl, registered, ops.dedup_lists_against_crawls)
        missing = missing_earlier_buckets(context.instance, context.assets_def.key, earlier, bucket)
        if missing:
            raise dg.Failure(f"{crawl} bucket {bucket}: earlier crawls have not deduplicated this bucket yet "
                             f"({', '.join(missing[:5])}); cross-crawl dedup needs them first: backfill in order")
        files = [output.files[bucket] for _, output in sorted(candidate_pairs.items())]
        # Earlier crawls' partitions of this very asset, where the IO manager stored them.
        own = [(c, stored_key(context.assets_def.key, {"crawl": c, "bucket": bucket}, layout)) for c in earlier]
        unique, report = dedup.run(storage.get(), files, own)
        context.log.info(f"{crawl} bucket {bucket}: {report.rows_in} pairs in, {report.rows_out} out")
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(unique.head(10).collect().to_dicts(), PREVIEW_COLUMNS + ["occurrences"])
        return dg.MaterializeResult(value=unique, metadata=metadata,
                                    check_results=[checks.schema("unique_pairs", _arrow_schema(unique), UNIQUE_SCHEMA)])

    return unique_pairs


def _arrow_schema(frame: object) -> pa.Schema:
    """The Arrow schema a polars LazyFrame will be written with, from its schema alone (nothing is computed)."""

    return pl.DataFrame(schema=frame.collect_schema()).to_arrow().schema  # type: ignore[attr-defined]


def missing_earlier_buckets(instance: dg.DagsterInstance, key: dg.AssetKey, earlier: list[str], bucket: str
                            ) -> list[str]:
    """Earlier crawls whose unique_pairs of this bucket are not materialized."""
    if not earlier:
        return []
    done = instance.get_materialized_partitions(key)
    return [c for c in earlier if str(dg.MultiPartitionKey({"crawl": c, "bucket": bucket})) not in done]


def build_crawl_assets(layout: Layout, ops: OperationsSettings) -> list[dg.AssetsDefinition]:
    return [wat_manifest_asset(layout, ops), candidate_pairs_asset(layout, ops), unique_pairs_asset(layout, ops)]
