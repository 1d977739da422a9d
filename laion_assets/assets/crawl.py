"""The Common Crawl stage: sample crawl -> WAT manifest -> candidate pairs -> unique pairs."""

import dagster as dg

from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.config import config_class, settings_from
from laion_assets.core import paths
from laion_assets.core.crawl import dedup, extract, manifest, source
from laion_assets.core.offline import sample
from laion_assets.core.paths import Layout
from laion_assets.core.settings import ExtractSettings, SampleSettings
from laion_assets.partitions import (
    bucket_partitions,
    chunk_partitions,
    chunk_to_crawl,
    chunks_to_buckets,
    crawl_and_bucket,
    crawl_of,
    crawl_partitions,
    dimension,
)
from laion_assets.resources import CrawlSourceResource, StorageResource

PREVIEW_COLUMNS = ["url", "text", "language", "language_score", "page_url"]
SampleCrawlConfig = config_class("SampleCrawlConfig", SampleSettings, doc="The built-in sample crawl's shape.")
ExtractConfig = config_class("ExtractConfig", ExtractSettings)


def sample_crawl_asset() -> dg.AssetsDefinition:
    @dg.asset(kinds={"python"}, group_name="crawl")
    def sample_crawl(context: dg.AssetExecutionContext, config: SampleCrawlConfig,
                     crawl_source: CrawlSourceResource) -> dg.MaterializeResult:
        """The built-in sample crawl, written as a local Common Crawl mirror at the crawl source's base;
        registers its crawl as a `crawls` partition."""
        if crawl_source.base.startswith(("s3://", "http://", "https://")):
            raise dg.Failure(f"the sample crawl is written to a local mirror; the crawl source is {crawl_source.base}")
        report = sample.build_sample_crawl(crawl_source.base, settings_from(SampleSettings, config))
        context.instance.add_dynamic_partitions(crawl_partitions.name, [report.crawl])
        return dg.MaterializeResult(
            metadata={"crawl": report.crawl, "mirror": dg.MetadataValue.path(report.mirror),
                      "wat_files": len(report.wat_files), "pages": report.pages, "images": report.images,
                      "image_links": report.image_links})

    return sample_crawl


def wat_manifest_asset(layout: Layout) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"parquet"}, group_name="crawl")
    def wat_manifest(context: dg.AssetExecutionContext, storage: StorageResource,
                     crawl_source: CrawlSourceResource) -> dg.MaterializeResult:
        """The crawl's `wat.paths.gz`, split into deterministic contiguous chunks."""
        crawl = crawl_of(context)
        store = storage.get()
        wat_paths = source.read_listing(crawl, crawl_source.settings(), crawl_source.s3_client())
        table = manifest.build_manifest(wat_paths, layout)
        key = paths.wat_manifest(crawl)
        store.write_parquet(key, table)
        sizes = [hi - lo for lo, hi in manifest.chunk_slices(len(wat_paths), layout.chunks)]
        context.log.info(f"{crawl}: {len(wat_paths)} WAT files in {layout.chunks} chunks")
        return dg.MaterializeResult(
            metadata={"wat_files": len(wat_paths), "chunks": layout.chunks, "files_per_chunk_min": min(sizes),
                      "files_per_chunk_max": max(sizes), "source": crawl_source.base,
                      "dagster/uri": store.uri(key), "first_paths": dg.MetadataValue.json(wat_paths[:5])})

    return wat_manifest


def candidate_pairs_asset(layout: Layout, wat_manifest: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=chunk_partitions(layout), kinds={"parquet"}, group_name="crawl",
              deps=[dg.AssetDep(wat_manifest, partition_mapping=chunk_to_crawl)])
    def candidate_pairs(context: dg.AssetExecutionContext, config: ExtractConfig, storage: StorageResource,
                        crawl_source: CrawlSourceResource) -> dg.MaterializeResult:
        """(image URL, alt text, language) pairs of the chunk's WAT files, split by URL-hash bucket."""
        crawl, chunk = crawl_of(context), dimension(context, "chunk")
        store = storage.get()
        wat_paths = manifest.chunk_paths(store.read_parquet(paths.wat_manifest(crawl)), chunk)
        context.log.info(f"{crawl} chunk {chunk}: {len(wat_paths)} WAT files")
        settings = settings_from(ExtractSettings, config)
        report, _ = extract.extract_chunk(
            store, crawl, chunk, wat_paths, layout, settings, crawl_source.settings(), crawl_source.s3_client(),
            lambda done, name: context.log.info(f"[{done}/{len(wat_paths)}] {name}"))
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS)
        metadata["dagster/uri"] = store.uri(paths.candidates_chunk(crawl, chunk, layout))
        metadata["dagster/row_count"] = report.counts.pairs
        if report.failed_files and settings.fail_on_unreadable_wat:
            raise dg.Failure(f"{len(report.failed_files)} WAT file(s) unreadable after retries (the other files'"
                             f" pairs are written): {report.failed_files[:3]}", metadata=metadata)
        return dg.MaterializeResult(metadata=metadata)

    return candidate_pairs


def unique_pairs_asset(layout: Layout, candidate_pairs: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), kinds={"parquet", "polars"}, group_name="crawl",
              deps=[dg.AssetDep(candidate_pairs, partition_mapping=chunks_to_buckets)])
    def unique_pairs(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        """Pairs with exact duplicate URLs removed, within the crawl and against earlier crawls' same bucket."""
        crawl, bucket = crawl_and_bucket(context)
        earlier = [c for c in context.instance.get_dynamic_partitions(crawl_partitions.name) if c < crawl]
        store = storage.get()
        report = dedup.dedup_bucket(store, crawl, bucket, layout, earlier)
        context.log.info(f"{crawl} bucket {bucket}: {report.rows_in} pairs in, {report.rows_out} out")
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS + ["occurrences"])
        metadata["dagster/uri"] = store.uri(paths.unique_pairs(crawl, bucket, layout))
        metadata["dagster/row_count"] = report.rows_out
        return dg.MaterializeResult(metadata=metadata)

    return unique_pairs


def build_crawl_assets(layout: Layout) -> list[dg.AssetsDefinition]:
    wat_manifest = wat_manifest_asset(layout)
    candidate_pairs = candidate_pairs_asset(layout, wat_manifest)
    return [sample_crawl_asset(), wat_manifest, candidate_pairs, unique_pairs_asset(layout, candidate_pairs)]
