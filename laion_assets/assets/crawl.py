"""The Common Crawl stage: sample crawl -> WAT manifest -> candidate pairs -> unique pairs."""


import io

import dagster as dg
import pyarrow.parquet as pq

from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.core import buckets, candidates, sample, wat
from laion_assets.partitions import Layout, chunk_to_crawl, chunks_to_buckets, crawl_of, crawl_partitions, dimension
from laion_assets.resources import CrawlSourceResource, StorageResource

PREVIEW_COLUMNS = ["url", "text", "language", "language_score", "page_url"]


class SampleCrawlConfig(dg.Config):
    crawl: str = sample.SampleSettings.crawl
    image_base_url: str = sample.SampleSettings.image_base_url
    wat_files: int = sample.SampleSettings.wat_files
    pages_per_file: int = sample.SampleSettings.pages_per_file
    seed: int = sample.SampleSettings.seed


class ExtractConfig(dg.Config):
    min_text_length: int = candidates.ExtractSettings.min_text_length
    max_text_length: int = candidates.ExtractSettings.max_text_length
    # A WAT file unreadable after retries fails the run (after the chunk's other files are written), so
    # that Dagster shows the partition as failed and a retry redoes it.
    fail_on_unreadable_wat: bool = True

    def settings(self) -> candidates.ExtractSettings:
        return candidates.ExtractSettings(min_text_length=self.min_text_length, max_text_length=self.max_text_length)


def build_crawl_assets(layout: Layout) -> list[dg.AssetsDefinition]:
    @dg.asset(kinds={"python"}, group_name="crawl")
    def sample_crawl(
        context: dg.AssetExecutionContext, config: SampleCrawlConfig, crawl_source: CrawlSourceResource
    ) -> dg.MaterializeResult:
        """The built-in sample crawl, written as a local Common Crawl mirror at the crawl source's base;
        registers its crawl as a `crawls` partition."""
        if crawl_source.base.startswith(("s3://", "http://", "https://")):
            raise dg.Failure(f"the sample crawl is written to a local mirror; the crawl source is {crawl_source.base}")
        report = sample.build_sample_crawl(
            crawl_source.base,
            sample.SampleSettings(
                crawl=config.crawl, image_base_url=config.image_base_url, wat_files=config.wat_files,
                pages_per_file=config.pages_per_file, seed=config.seed,
            ),
        )
        context.instance.add_dynamic_partitions(crawl_partitions.name, [report.crawl])
        return dg.MaterializeResult(
            metadata={"crawl": report.crawl, "mirror": dg.MetadataValue.path(report.mirror),
                      "wat_files": len(report.wat_files), "pages": report.pages, "images": report.images,
                      "image_links": report.image_links}
        )

    @dg.asset(partitions_def=crawl_partitions, kinds={"parquet"}, group_name="crawl")
    def wat_manifest(
        context: dg.AssetExecutionContext, storage: StorageResource, crawl_source: CrawlSourceResource
    ) -> dg.MaterializeResult:
        """The crawl's `wat.paths.gz`, split into deterministic contiguous chunks."""
        crawl = crawl_of(context)
        store = storage.get()
        paths = wat.read_listing(crawl, crawl_source.settings(), crawl_source.s3_client())
        table = wat.build_manifest(paths, layout.chunks, lambda c: buckets.chunk_key(c, layout.chunks))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        key = wat.manifest_key(crawl)
        store.write_bytes(key, buf.getvalue())
        sizes = [hi - lo for lo, hi in wat.chunk_slices(len(paths), layout.chunks)]
        context.log.info(f"{crawl}: {len(paths)} WAT files in {layout.chunks} chunks")
        return dg.MaterializeResult(
            metadata={"wat_files": len(paths), "chunks": layout.chunks, "files_per_chunk_min": min(sizes),
                      "files_per_chunk_max": max(sizes), "source": crawl_source.base,
                      "dagster/uri": store.uri(key), "first_paths": dg.MetadataValue.json(paths[:5])}
        )

    @dg.asset(
        partitions_def=layout.chunk_partitions(),
        deps=[dg.AssetDep(wat_manifest, partition_mapping=chunk_to_crawl)],
        kinds={"parquet"},
        group_name="crawl",
    )
    def candidate_pairs(
        context: dg.AssetExecutionContext,
        config: ExtractConfig,
        storage: StorageResource,
        crawl_source: CrawlSourceResource,
    ) -> dg.MaterializeResult:
        """(image URL, alt text, language) pairs of the chunk's WAT files, split by URL-hash bucket."""
        crawl, chunk = crawl_of(context), dimension(context, "chunk")
        store = storage.get()
        manifest = pq.read_table(io.BytesIO(store.read_bytes(wat.manifest_key(crawl))))
        paths = [p for c, p in zip(manifest["chunk"].to_pylist(), manifest["path"].to_pylist(), strict=True)
                 if c == chunk]
        context.log.info(f"{crawl} chunk {chunk}: {len(paths)} WAT files")

        def progress(done: int, name: str) -> None:
            context.log.info(f"[{done}/{len(paths)}] {name}")

        report = candidates.extract_chunk(
            store, crawl, chunk, paths, layout.buckets, config.settings(), crawl_source.settings(),
            crawl_source.s3_client(), progress,
        )
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS)
        metadata["dagster/uri"] = store.uri(buckets.candidates_chunk_prefix(crawl, chunk, layout.buckets))
        metadata["dagster/row_count"] = report.counts.pairs
        if report.failed_files and config.fail_on_unreadable_wat:
            raise dg.Failure(
                f"{len(report.failed_files)} WAT file(s) unreadable after retries (the other files' pairs are"
                f" written): {report.failed_files[:3]}",
                metadata=metadata,
            )
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset(
        partitions_def=layout.bucket_partitions(),
        deps=[dg.AssetDep(candidate_pairs, partition_mapping=chunks_to_buckets)],
        kinds={"parquet", "polars"},
        group_name="crawl",
    )
    def unique_pairs(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        """Pairs with exact duplicate URLs removed, within the crawl and against earlier crawls' same bucket."""
        crawl, bucket = crawl_of(context), dimension(context, "bucket")
        earlier = [c for c in context.instance.get_dynamic_partitions(crawl_partitions.name) if c < crawl]
        store = storage.get()
        report = buckets.dedup_bucket(store, crawl, bucket, layout.chunk_keys(), layout.buckets, earlier)
        context.log.info(f"{crawl} bucket {bucket}: {report.rows_in} pairs in, {report.rows_out} out")
        metadata = to_metadata(report.metadata())
        metadata["preview"] = preview_table(report.preview, PREVIEW_COLUMNS + ["occurrences"])
        metadata["dagster/uri"] = store.uri(buckets.unique_pairs_key(crawl, bucket, layout.buckets))
        metadata["dagster/row_count"] = report.rows_out
        return dg.MaterializeResult(metadata=metadata)

    return [sample_crawl, wat_manifest, candidate_pairs, unique_pairs]
