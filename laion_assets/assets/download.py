"""The download stage: unique pairs of a crawl x bucket -> resized images in webdataset shards."""

import dagster as dg

from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.config import config_class, settings_from
from laion_assets.core import paths
from laion_assets.core.download.distributor import download
from laion_assets.core.download.plan import read_manifest
from laion_assets.core.download.reader import InputColumns
from laion_assets.core.paths import Layout
from laion_assets.core.settings import DownloadSettings, ResizeSettings
from laion_assets.partitions import bucket_partitions, crawl_and_bucket
from laion_assets.resources import ImageFetchResource, StorageResource

PREVIEW_COLUMNS = ["key", "status", "error_message", "width", "height", "original_width", "original_height", "url"]
# Resize and shard settings per run; how to fetch (politeness, safety) is the image_fetch resource's.
# More partitions at once come from the `download` pool, not from more processes per run.
DownloadConfig = config_class("DownloadConfig", DownloadSettings, ResizeSettings,
                              doc="How the bucket's images are stored and how many processes download them.")
UNIQUE_PAIRS_COLUMNS = InputColumns(url="url", caption="text", language="language")


def download_settings(config: DownloadConfig, image_fetch: ImageFetchResource) -> DownloadSettings:
    return settings_from(DownloadSettings, config, fetch=image_fetch.settings(),
                         resize=settings_from(ResizeSettings, config))


def build_download_assets(layout: Layout, unique_pairs: dg.AssetsDefinition) -> list[dg.AssetsDefinition]:
    @dg.asset(partitions_def=bucket_partitions(layout), deps=[unique_pairs], kinds={"webdataset", "parquet"},
              group_name="images", pool="download")
    def image_shards(context: dg.AssetExecutionContext, config: DownloadConfig, storage: StorageResource,
                     image_fetch: ImageFetchResource) -> dg.MaterializeResult:
        """Every URL of the bucket downloaded, resized and written as webdataset tar shards with a Parquet
        row per URL (success or not) and a `_stats.json` marker per shard; reruns skip complete shards whose
        input rows and settings are unchanged; `_manifest.json` lists the complete shards, written last."""
        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        prefix = paths.image_shards(crawl, bucket, layout)
        seen = {"done": 0, "ok": 0}

        def progress(done: int, ok: int) -> None:
            seen["done"] += done
            seen["ok"] += ok
            context.log.debug(f"{seen['done']} URLs done, {seen['ok']} images")

        with store.local_copies([paths.unique_pairs(crawl, bucket, layout)]) as (path,):
            report = download(path, store, prefix, download_settings(config, image_fetch), UNIQUE_PAIRS_COLUMNS,
                              progress, context.log.info)
        context.log.info(f"{crawl} bucket {bucket}: {report.summary()}")
        metadata = to_metadata(report.metadata())
        shards = read_manifest(store, prefix).keys(prefix)
        if shards:
            metadata["preview"] = preview_table(store.read_parquet(shards[0].rows).slice(0, 8).to_pylist(),
                                                PREVIEW_COLUMNS)
        metadata["dagster/uri"] = store.uri(prefix)
        metadata["dagster/row_count"] = report.statuses["success"]
        return dg.MaterializeResult(metadata=metadata)

    return [image_shards]
