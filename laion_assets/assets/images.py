"""The download stage: unique pairs of a crawl x bucket -> resized images in webdataset shards."""


import dagster as dg
import pyarrow.parquet as pq

from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.core import buckets, images
from laion_assets.core.settings import DownloadSettings, ResizeSettings
from laion_assets.partitions import Layout, crawl_of, dimension
from laion_assets.resources import ImageFetchResource, StorageResource

PREVIEW_COLUMNS = ["key", "status", "error_message", "width", "height", "original_width", "original_height", "url"]


class DownloadConfig(dg.Config):
    image_size: int = ResizeSettings.image_size
    resize_mode: str = ResizeSettings.resize_mode
    encode_format: str = ResizeSettings.encode_format
    encode_quality: int = ResizeSettings.encode_quality
    min_image_size: int = ResizeSettings.min_image_size
    max_aspect_ratio: float = 1e9  # effectively none (JSON config has no infinity)
    keep_original: bool = ResizeSettings.keep_original
    samples_per_shard: int = DownloadSettings.samples_per_shard
    # Processes per run; 0 means one per CPU core. More partitions at once come from the `download` pool.
    processes: int = DownloadSettings.processes

    def resize(self) -> ResizeSettings:
        return ResizeSettings(image_size=self.image_size, resize_mode=self.resize_mode,
                              encode_format=self.encode_format, encode_quality=self.encode_quality,
                              min_image_size=self.min_image_size, max_aspect_ratio=self.max_aspect_ratio,
                              keep_original=self.keep_original)


def image_shards_prefix(crawl: str, bucket: str, n_buckets: int) -> str:
    return f"crawls/{crawl}/images/buckets={n_buckets}/bucket={bucket}"


def build_image_assets(layout: Layout, unique_pairs: dg.AssetsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(
        partitions_def=layout.bucket_partitions(),
        deps=[unique_pairs],
        kinds={"webdataset", "parquet"},
        group_name="images",
        pool="download",
    )
    def image_shards(
        context: dg.AssetExecutionContext, config: DownloadConfig, storage: StorageResource,
        image_fetch: ImageFetchResource,
    ) -> dg.MaterializeResult:
        """Every URL of the bucket downloaded, resized and written as webdataset tar shards with a Parquet
        row per URL (success or not) and a `_stats.json` marker per shard; reruns skip complete shards."""
        crawl, bucket = crawl_of(context), dimension(context, "bucket")
        store = storage.get()
        prefix = image_shards_prefix(crawl, bucket, layout.buckets)
        settings = DownloadSettings(samples_per_shard=config.samples_per_shard, processes=config.processes,
                                    fetch=image_fetch.settings(), resize=config.resize())
        seen = {"done": 0, "ok": 0}

        def progress(done: int, ok: int) -> None:
            seen["done"] += done
            seen["ok"] += ok
            context.log.debug(f"{seen['done']} URLs done, {seen['ok']} images")

        with store.local_copies([buckets.unique_pairs_key(crawl, bucket, layout.buckets)]) as (path,):
            report = images.download(path, store, prefix, settings, caption_col="text", progress=progress,
                                     log=context.log.info)
        context.log.info(f"{crawl} bucket {bucket}: {report.summary()}")
        metadata = to_metadata(report.metadata())
        first = [k for k in store.list(prefix) if k.endswith(".parquet")][:1]
        if first:
            with store.local_copies(first) as (local,):
                metadata["preview"] = preview_table(pq.read_table(local).slice(0, 8).to_pylist(), PREVIEW_COLUMNS)
        metadata["dagster/uri"] = store.uri(prefix)
        metadata["dagster/row_count"] = report.statuses["success"]
        return dg.MaterializeResult(metadata=metadata)

    return [image_shards]
