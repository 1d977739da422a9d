"""The release stage: crawl-wide image dedup and semantic dedup, filtered metadata per crawl x bucket in LAION-5B's
columns, and the crawl's release (parts + manifest).

Everything comes in through the IO manager: the downloads' shard manifests, the CLIP stage's score tables, the
unique pairs (for the language score), the dedup table; the release reads the filtered metadata records."""

import dagster as dg
import polars as pl

from laion_assets import k8s, tags
from laion_assets.assets import checks
from laion_assets.assets.clip import (
    AESTHETIC_SCORES,
    CLIP_SCORES,
    EMBEDDING_MODEL,
    IMAGE_EMBEDDINGS,
    SAFETY_SCORES,
    WATERMARK_SCORES,
)
from laion_assets.assets.crawl import UNIQUE_PAIRS
from laion_assets.assets.download import IMAGE_SHARDS
from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.automation import REPROCESS, versioned_sources
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.crawl import url_list
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.paths import Layout
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.release.release import ReleaseManifest
from laion_assets.core.settings import OperationsSettings, ReleaseSettings, build
from laion_assets.io_manager import stored_key
from laion_assets.partitions import bucket_partitions, crawl_and_bucket, crawl_of, crawl_partitions, to_crawl
from laion_assets.resources import ModelRegistryResource, RemovalListResource, StorageResource

CODE_VERSION = "1"
ReleaseConfig = config_class("ReleaseConfig", ReleaseSettings, doc="Image dedup and the release's layout.")
PREVIEW_COLUMNS = ["URL", "TEXT", "WIDTH", "HEIGHT", "LANGUAGE", "similarity", "punsafe", "pwatermark", "aesthetic",
                   "subset"]
REMOVAL_SOURCES = {"removal_list": "The removal list under removals/ (data version: its latest version): a new "
                                   "version re-runs the image dedup, filtered metadata, release and statistics."}
REMOVAL_LIST, IMAGE_DEDUP = dg.AssetKey("removal_list"), dg.AssetKey("image_dedup")
SEMANTIC_DEDUP = dg.AssetKey("semantic_dedup")
FILTERED_METADATA, RELEASE = dg.AssetKey("filtered_metadata"), dg.AssetKey("release")


def removal_sources(ops: OperationsSettings) -> tuple[list, dg.SensorDefinition]:
    return versioned_sources(REMOVAL_SOURCES, "removals", lambda removals: {"removal_list": removals.version()},
                             "release", ops.sensor_interval_s)


def earlier_crawls(context: dg.AssetExecutionContext, crawl: str, lists_against_crawls: bool = False) -> list[str]:
    """Registered crawls before this one whose image (or semantic) dedup exists; a missing one fails the run
    (backfill in order), as URL dedup does. A URL list is compared with the crawls only when asked
    (`dedup_lists_against_crawls`), as in URL dedup."""
    registered = context.instance.get_dynamic_partitions(crawl_partitions.name)
    earlier = url_list.compared_crawls(crawl, registered, lists_against_crawls)
    done = context.instance.get_materialized_partitions(context.assets_def.key)
    missing = [c for c in earlier if c not in done]
    if missing:
        raise dg.Failure(f"{crawl}: earlier crawls have no image dedup yet ({', '.join(missing[:5])}); cross-crawl "
                         "image dedup needs them first: backfill in order")
    return earlier


def image_dedup_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"polars", "parquet"}, group_name="release",
              tags=tags.stage("release", cross_crawl_dedup="image"), op_tags=k8s.cpu_pod(cpu="1", memory="4Gi"),
              code_version=CODE_VERSION, automation_condition=REPROCESS, deps=[REMOVAL_LIST],
              ins={"image_shards": dg.AssetIn(IMAGE_SHARDS, partition_mapping=to_crawl),
                   "clip_scores": dg.AssetIn(CLIP_SCORES, partition_mapping=to_crawl)})
    def image_dedup(context: dg.AssetExecutionContext, config: ReleaseConfig, storage: StorageResource,
                    removals: RemovalListResource, image_shards: dict[str, ShardsManifest],
                    clip_scores: dict[str, pl.LazyFrame]):
        """Every kept sample of the crawl marked as an exact duplicate (same sha256) or near duplicate (pHash within
        the radius) of the first such sample by crawl, bucket and key, across all buckets and earlier crawls."""
        from laion_assets.core.release import images

        crawl = crawl_of(context)
        store = storage.get()
        settings = build(ReleaseSettings, config)
        # Earlier crawls' partitions of this very asset, where the IO manager stored them.
        compared = earlier_crawls(context, crawl, ops.dedup_lists_against_crawls)
        own = {c: stored_key(context.assets_def.key, {"crawl": c}, layout) for c in compared}
        earlier = {c: pl.scan_parquet(store.scratch_copies([key])[0]) for c, key in own.items()}
        removal_list = removals.load()
        table, report = images.run(store, crawl, image_shards, clip_scores, earlier, settings.near_radius,
                                   removal_list.reasons if len(removal_list) else None, removal_list.version,
                                   settings.dedup_partition_rows)
        context.log.info(f"{crawl}: {report.samples} kept samples, {report.exact_duplicates} exact and "
                         f"{report.near_duplicates} near duplicates")
        metadata = to_metadata(report.metadata())
        metadata["removal_version"] = removal_list.version
        marked = pl.col("duplicate_of").is_not_null() | pl.col("near_duplicate_of").is_not_null()
        dupes = pl.scan_parquet(table.path).filter(marked).head(10).collect()
        metadata["preview"] = preview_table(dupes.to_dicts(), ["sample_id", "duplicate_of", "near_duplicate_of",
                                                               "url"])
        return dg.MaterializeResult(value=table, metadata=metadata)

    return image_dedup


def semantic_dedup_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"faiss", "parquet"}, group_name="release",
              tags=tags.stage("release", cross_crawl_dedup="semantic"),
              op_tags=k8s.cpu_pod(cpu="2", memory="4Gi"), code_version=CODE_VERSION,
              automation_condition=REPROCESS, deps=[REMOVAL_LIST, EMBEDDING_MODEL],
              ins={"image_embeddings": dg.AssetIn(IMAGE_EMBEDDINGS, partition_mapping=to_crawl),
                   "image_dedup": dg.AssetIn(IMAGE_DEDUP)})
    def semantic_dedup(context: dg.AssetExecutionContext, config: ReleaseConfig, storage: StorageResource,
                       removals: RemovalListResource, models: ModelRegistryResource,
                       image_embeddings: dict[str, EmbeddingsManifest], image_dedup: pl.LazyFrame):
        """Every embedded sample of the crawl marked as a semantic duplicate (image embeddings' cosine >= 1 -
        semantic_eps, SemDeDup) of the first such sample by crawl, bucket and key, across all buckets and earlier
        crawls; removed samples and exact duplicates do not compete."""
        from laion_assets.core.clip.embeddings import EmbeddingModelMismatch
        from laion_assets.core.release import semantic

        crawl = crawl_of(context)
        store = storage.get()
        settings = build(ReleaseSettings, config)
        earlier = {}
        for c in earlier_crawls(context, crawl, ops.dedup_lists_against_crawls):
            table = pl.scan_parquet(store.scratch_copies([stored_key(context.assets_def.key, {"crawl": c},
                                                                     layout)])[0])
            buckets = table.select(pl.col("bucket").unique()).collect()["bucket"].to_list()
            earlier[c] = semantic.EarlierCrawl(table, {b: paths.bucket_embeddings(c, b, layout) for b in buckets})
        removal_list = removals.load()
        try:
            expected = models.model_set(False).embed.name
        except (FileNotFoundError, ValueError) as err:
            # The registry names the model; without it the embeddings' own tags and dimensions are still checked.
            context.log.warning(f"no embedding model from the registry ({err}): not checked by name")
            expected = ""
        try:
            table, report = semantic.run(store, crawl, {b: m.files for b, m in image_embeddings.items()},
                                         image_dedup, earlier, settings, expected,
                                         removal_list.reasons if len(removal_list) else None, removal_list.version)
        except EmbeddingModelMismatch as err:
            raise dg.Failure(str(err)) from err
        context.log.info(f"{crawl}: {report.duplicates} of {report.samples} embedded samples are semantic "
                         f"duplicates ({report.share:.2%}, cosine >= {1 - report.eps:g})")
        metadata = to_metadata(report.metadata())
        metadata.update({"removal_version": removal_list.version,
                         # A number per crawl, so that the UI plots the share across crawls.
                         "semantic_duplicate_share": float(report.share),
                         "dagster/row_count": report.samples})
        dupes = pl.scan_parquet(table.path).filter(pl.col("semantic_duplicate_of").is_not_null()).head(10).collect()
        metadata["preview"] = preview_table(dupes.to_dicts(), ["sample_id", "semantic_duplicate_of",
                                                               "semantic_similarity"])
        return dg.MaterializeResult(value=table, metadata=metadata)

    return semantic_dedup


def filtered_metadata_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), kinds={"polars", "parquet"}, group_name="release",
              tags=tags.stage("release"), op_tags=k8s.cpu_pod(cpu="1", memory="4Gi"), code_version=CODE_VERSION,
              automation_condition=REPROCESS,
              ins={"image_shards": dg.AssetIn(IMAGE_SHARDS), "clip_scores": dg.AssetIn(CLIP_SCORES),
                   "safety_scores": dg.AssetIn(SAFETY_SCORES), "watermark_scores": dg.AssetIn(WATERMARK_SCORES),
                   "unique_pairs": dg.AssetIn(UNIQUE_PAIRS),
                   "image_dedup": dg.AssetIn(IMAGE_DEDUP, partition_mapping=to_crawl),
                   "aesthetic_scores": dg.AssetIn(AESTHETIC_SCORES),
                   "semantic_dedup": dg.AssetIn(SEMANTIC_DEDUP, partition_mapping=to_crawl)},
              check_specs=[checks.spec("filtered_metadata", "schema", "LAION-5B's columns, then ours"),
                           checks.spec("filtered_metadata", "one_row_per_kept_sample",
                                       "every kept sample is a row or counted as removed")])
    def filtered_metadata(context: dg.AssetExecutionContext, storage: StorageResource,
                          removals: RemovalListResource, image_shards: ShardsManifest, clip_scores: pl.LazyFrame,
                          safety_scores: pl.LazyFrame, watermark_scores: pl.LazyFrame, unique_pairs: pl.LazyFrame,
                          image_dedup: pl.LazyFrame, aesthetic_scores: pl.LazyFrame, semantic_dedup: pl.LazyFrame):
        """One row per sample that downloaded, passed the CLIP threshold and is not removed (by the removal list or
        the concept filter): URL, TEXT, WIDTH, HEIGHT, LANGUAGE, similarity, pwatermark, punsafe, hash, aesthetic,
        then key, shard, sha256, phash, language_score, crawl, subset, duplicate_of, near_duplicate_of,
        semantic_duplicate_of, then the
        columns the download added (a URL list's id, save_additional_columns)."""
        from laion_assets.core.release import filtered
        from laion_assets.core.release.release import release_schema

        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        duplicates = image_dedup.filter(pl.col("bucket") == bucket)
        language = unique_pairs.select("url", "language_score").collect()
        # The latest list is applied here too: a rebuild never brings back a sample removed since the dedup ran.
        removal_list = removals.load()
        record, table = filtered.run(store, crawl, bucket, layout, image_shards, clip_scores, safety_scores,
                                     watermark_scores, language, duplicates,
                                     removal_list.reasons if len(removal_list) else None, removal_list.version,
                                     aesthetic_scores, semantic_dedup.filter(pl.col("bucket") == bucket))
        metadata = to_metadata(record.metadata())
        metadata.update({"dagster/row_count": record.rows, "dagster/uri": store.uri(record.file),
                         "preview": preview_table(table.slice(0, 8).to_pylist(), PREVIEW_COLUMNS)})
        for reason, n in record.removed.items():
            metadata[f"removed/{reason}"] = n
        accounted = record.rows + sum(record.removed.values()) == record.kept
        return dg.MaterializeResult(value=record, metadata=metadata, check_results=[
            # LAION's and our columns as documented, then what the download's rows added (a list's uid).
            checks.schema("filtered_metadata", table.schema, release_schema([table.schema])),
            checks.holds("filtered_metadata", "one_row_per_kept_sample", accounted,
                         f"{record.rows} rows and {sum(record.removed.values())} removed of {record.kept} kept")])

    return filtered_metadata


def release_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"parquet"}, group_name="release", tags=tags.stage("release"),
              op_tags=k8s.cpu_pod(cpu="1", memory="4Gi"), code_version=CODE_VERSION, automation_condition=REPROCESS,
              ins={"filtered_metadata": dg.AssetIn(FILTERED_METADATA, partition_mapping=to_crawl)},
              check_specs=[checks.spec("release", "rows_match_filtered",
                                       "the parts' rows equal the filtered rows (removals already out) less the "
                                       "duplicates the settings drop")])
    def release(context: dg.AssetExecutionContext, config: ReleaseConfig, storage: StorageResource,
                filtered_metadata: dict[str, FilteredBucket]):
        """The crawl's dataset: `release/{en,multi,nolang}/part-NNNNN.parquet` and `_manifest.json` (written last:
        counts, parts with sha256 and size, models and thresholds, removal version, code version, time)."""
        from laion_assets.core.release import release as stage
        from laion_assets.core.release.release import account_rows, release_summary

        crawl = crawl_of(context)
        store = storage.get()
        settings = build(ReleaseSettings, config)
        buckets = filtered_metadata
        models: dict = {}
        for record in buckets.values():
            models.update(record.models)
        manifest = stage.run(store, crawl, buckets, layout.bucket_keys(), settings, models, CODE_VERSION)
        metadata = to_metadata(release_summary(manifest))
        metadata.update({"dagster/row_count": manifest.rows, "dagster/uri": store.uri(paths.release(crawl)),
                         "removed_by_reason": dg.MetadataValue.json(manifest.removed),
                         "dropped": dg.MetadataValue.json(manifest.dropped)})
        if manifest.parts:
            first = store.read_parquet(manifest.part_keys()[0])
            metadata["preview"] = preview_table(first.slice(0, 10).to_pylist(), PREVIEW_COLUMNS)
        context.log.info(f"{crawl}: released {manifest.rows} samples in {len(manifest.parts)} parts")
        account = account_rows(store, manifest, buckets, settings)
        return dg.MaterializeResult(value=manifest, metadata=metadata, check_results=[
            checks.holds("release", "rows_match_filtered", account.holds, account.describe(),
                         released=account.released, expected=account.expected)])

    return release


def dataset_statistics_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"json", "markdown"}, group_name="release",
              tags=tags.stage("release"), code_version=CODE_VERSION, automation_condition=REPROCESS,
              ins={"release": dg.AssetIn(RELEASE)})
    def dataset_statistics(context: dg.AssetExecutionContext, storage: StorageResource, release: ReleaseManifest):
        """The figures of the LAION-5B post for each subset of the release: totals, sizes, quantiles, unsafe and
        watermark proportions, text length, top languages; statistics.json, statistics.md and PNG plots beside the
        release, and every headline figure as a numeric metadata entry (plotted across crawls by the UI)."""
        from laion_assets.core.release import statistics

        crawl = crawl_of(context)
        store = storage.get()
        stats, written = statistics.run(store, crawl, release.part_keys())
        metadata: dict = {name: float(v) if isinstance(v, float) else int(v)
                          for name, v in statistics.headline_figures(stats).items()}
        metadata.update({
            "statistics": dg.MetadataValue.md(statistics.to_markdown(stats, f"{crawl} release statistics")),
            "dagster/uri": store.uri(written["json"]), "removal_version": release.removal_version,
            "files": dg.MetadataValue.json({k: store.uri(v) for k, v in written.items()})})
        for name, key in written.items():
            if key.endswith(".png"):
                metadata[f"plot/{name}"] = dg.MetadataValue.path(store.uri(key))
        return dg.MaterializeResult(metadata=metadata)

    return dataset_statistics


def build_release_assets(layout: Layout, ops: OperationsSettings) -> list:
    sources, _ = removal_sources(ops)
    return [*sources, image_dedup_asset(layout, ops), semantic_dedup_asset(layout, ops),
            filtered_metadata_asset(layout, ops), release_asset(layout, ops), dataset_statistics_asset(layout, ops)]
