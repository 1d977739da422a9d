"""The download stage: unique pairs of a crawl x bucket -> resized images in webdataset shards.

The bucket's unique pairs come in through the IO manager; the shards are bulk files, so the asset returns the
download's record of its complete shards (`_manifest.json`, which the download writes last itself).
"""


import dagster as dg
import polars as pl

from laion_assets import k8s, tags
from laion_assets.assets import checks
from laion_assets.assets.crawl import network_retries
from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.automation import REPROCESS
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.crawl import url_list
from laion_assets.core.paths import Layout
from laion_assets.core.progress import throttled
from laion_assets.core.settings import DownloadSettings, OperationsSettings, ResizeSettings, build
from laion_assets.partitions import bucket_partitions, crawl_and_bucket
from laion_assets.resources import ChecksResource, ImageFetchResource, StorageResource

CODE_VERSION = "2"
IMAGE_SHARDS = dg.AssetKey("image_shards")
PREVIEW_COLUMNS = ["key", "status", "error_message", "width", "height", "original_width", "original_height", "url"]
# Resize and shard settings per run; how to fetch (politeness, safety) is the image_fetch resource's.
# More partitions at once come from the `download` pool, not from more processes per run.
DownloadConfig = config_class("DownloadConfig", DownloadSettings, ResizeSettings,
                              doc="How the bucket's images are stored and how many processes download them.")


def download_settings(config: DownloadConfig, image_fetch: ImageFetchResource) -> DownloadSettings:
    return build(DownloadSettings, config, fetch=image_fetch.settings(),
                         resize=build(ResizeSettings, config))


def image_shards_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), kinds={"webdataset", "parquet"}, group_name="images",
              tags=tags.stage("download"), op_tags=k8s.cpu_pod(cpu="15", memory="24Gi", node_pool="download"),
              pool="download", code_version=CODE_VERSION, retry_policy=network_retries(ops),
              automation_condition=REPROCESS,
              check_specs=[checks.spec("image_shards", "one_row_per_url", "every input URL has exactly one row"),
                           checks.spec("image_shards", "success_rate", "download success rate in its band",
                                       blocking=False)])
    def image_shards(context: dg.AssetExecutionContext, config: DownloadConfig, storage: StorageResource,
                     image_fetch: ImageFetchResource, check_bands: ChecksResource,
                     unique_pairs: pl.LazyFrame):
        """Every URL of the bucket downloaded, resized and written as webdataset tar shards with a Parquet row per
        URL (success or not) and a `_stats.json` marker per shard; reruns skip complete shards whose input rows and
        settings are unchanged; `_manifest.json` lists the complete shards, written last."""
        from laion_assets.core.download import distributor
        from laion_assets.core.download.reader import pairs_inputs

        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        id_col = url_list.read_record(store, crawl).id_col if url_list.is_list(crawl) else ""
        inputs, settings = pairs_inputs(unique_pairs, download_settings(config, image_fetch), id_col)
        seen = {"done": 0, "ok": 0}
        log = throttled(context.log.info)

        def progress(done: int, ok: int) -> None:
            seen["done"] += done
            seen["ok"] += ok
            log(f"{seen['done']} of {inputs.num_rows} URLs done, {seen['ok']} images")

        prefix = paths.image_shards(crawl, bucket, layout)
        report = distributor.run(inputs, store, prefix, settings, progress=progress, log=context.log.info)
        context.log.info(f"{crawl} bucket {bucket}: {report.summary()}")
        manifest = report.manifest
        metadata = to_metadata(report.metadata())
        if manifest.shards:
            first = store.read_parquet(manifest.keys()[0].rows)
            metadata["preview"] = preview_table(first.slice(0, 8).to_pylist(), PREVIEW_COLUMNS)
        metadata["dagster/row_count"] = report.statuses["success"]
        rows_per_shard = [store.parquet_rows(k.rows) for k in manifest.keys()]
        bands = check_bands.settings()
        return dg.MaterializeResult(value=manifest, metadata=metadata, check_results=[
            checks.holds("image_shards", "one_row_per_url",
                         manifest.rows == inputs.num_rows == sum(rows_per_shard) == report.total
                         and rows_per_shard == [s.count for s in manifest.shards],
                         f"{inputs.num_rows} input URLs, {sum(rows_per_shard)} rows in {len(rows_per_shard)} shards",
                         input_urls=inputs.num_rows, rows=sum(rows_per_shard)),
            checks.band("image_shards", "success_rate", report.success_rate, bands.min_success_rate,
                        bands.max_success_rate, "download success rate")])

    return image_shards


def build_download_assets(layout: Layout, ops: OperationsSettings) -> list[dg.AssetsDefinition]:
    return [image_shards_asset(layout, ops)]
