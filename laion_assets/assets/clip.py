"""The CLIP stage: similarity filtering, ViT-L/14 embeddings, safety and watermark scores per crawl x bucket.

Each asset depends on the model registry source it uses (the filter CLIPs and thresholds, the embedding model,
the safety head, the watermark classifier): a new data version there (a new checkpoint, a changed threshold)
re-runs it and what follows. A threshold change re-filters the stored similarities without rescoring. The core
(torch) is imported inside the asset bodies, so that loading the code location stays fast.
"""

import dagster as dg
import pyarrow as pa

from laion_assets.assets import checks
from laion_assets.assets.metadata import preview_table, throttled, to_metadata
from laion_assets.automation import REPROCESS, versioned_sources
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.paths import Layout
from laion_assets.core.settings import ClipSettings, OperationsSettings
from laion_assets.k8s import op_tags
from laion_assets.partitions import bucket_partitions, crawl_and_bucket
from laion_assets.resources import ChecksResource, ModelRegistryResource, StorageResource

CODE_VERSION = "2"
ScoreConfig = config_class("ScoreConfig", ClipSettings, doc="How clip_scores treats a bucket scored before.")
SCORE_PREVIEW = ["key", "language", "model", "similarity", "keep", "caption"]
MODEL_SOURCES = {
    "clip_filter_models": "The English and multilingual CLIPs and their thresholds (data version: weights and "
                          "thresholds).",
    "embedding_model": "The CLIP whose embeddings are stored (ViT-L/14 in LAION).",
    "safety_model": "The safety head and its threshold.",
    "watermark_model": "The watermark classifier and its threshold.",
}


def model_sources(ops: OperationsSettings) -> tuple[list, dg.SensorDefinition]:
    return versioned_sources(MODEL_SOURCES, "models", lambda models: models.versions(), "models",
                             ops.sensor_interval_s)


def clip_scores_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=op_tags("clip_scores", ops),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "parquet"}, group_name="clip",
              pool="gpu", code_version=CODE_VERSION, automation_condition=REPROCESS, deps=["clip_filter_models"],
              check_specs=[checks.spec("clip_scores", "schema", "the score columns"),
                           checks.spec("clip_scores", "one_row_per_image", "a row for every downloaded image"),
                           checks.spec("clip_scores", "kept_fraction", "kept fraction in its band", blocking=False)])
    def clip_scores(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                    models: ModelRegistryResource, check_bands: ChecksResource,
                    image_shards: ShardsManifest):
        """Image-caption cosine similarity of every downloaded sample (English captions: the English CLIP;
        other and undetected languages: the multilingual CLIP), the model and threshold used, and keep."""
        from laion_assets.core.clip import scores

        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        own = paths.clip_scores(crawl, bucket, layout)  # this asset's previous output, for reuse
        chosen = models.model_set(context.log.info)
        previous = store.read_parquet(own) if store.exists(own) else None
        table, report = scores.score_bucket(store, image_shards, chosen, models.settings(), previous,
                                            config.reuse_similarities, throttled(context.log.info))
        context.log.info(f"{crawl} bucket {bucket}: {report.samples} samples, {report.kept} kept"
                         + (" (re-filtered stored similarities)" if report.refiltered_only else ""))
        metadata = to_metadata(report.metadata())
        metadata.update({
            "thresholds": dg.MetadataValue.json({s.name: s.threshold for s in (chosen.clip_en, chosen.clip_multi)}),
            "similarity_histogram": dg.MetadataValue.json(scores.similarity_histogram(table)),
            "preview": preview_table(table.slice(0, 8).to_pylist(), SCORE_PREVIEW)})
        successes = image_shards.statuses.get("success", 0)
        bands = check_bands.settings()
        return dg.MaterializeResult(value=table, metadata=metadata, check_results=[
            checks.schema("clip_scores", table.schema, scores.SCORE_SCHEMA),
            checks.holds("clip_scores", "one_row_per_image", table.num_rows == successes,
                         f"{table.num_rows} rows for {successes} downloaded images"),
            checks.band("clip_scores", "kept_fraction", report.kept / max(1, report.samples),
                        bands.min_kept_fraction, bands.max_kept_fraction, "kept fraction")])

    return clip_scores


def image_embeddings_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=op_tags("image_embeddings", ops),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "numpy"}, group_name="clip", pool="gpu",
              code_version=CODE_VERSION, automation_condition=REPROCESS, deps=["embedding_model"],
              check_specs=[checks.spec("image_embeddings", "row_aligned",
                                       "image and text arrays and metadata have one row per kept sample")])
    def image_embeddings(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelRegistryResource,
                         image_shards: ShardsManifest, clip_scores: pa.Table
                         ):
        """L2-normalized image and text embeddings (ViT-L/14; float16) of the kept samples, in clip-retrieval's
        layout: img_emb/img_emb_{bucket}.npy, text_emb/text_emb_{bucket}.npy, metadata/metadata_{bucket}.parquet."""
        from laion_assets.core.clip import embeddings, scores

        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        chosen = models.model_set(context.log.info)
        keep = scores.kept_keys(clip_scores)
        img, txt, meta, report = embeddings.embed_bucket(store, image_shards, keep, chosen.embed, models.settings(),
                                                         throttled(context.log.info))
        manifest = embeddings.write_embeddings(store, paths.bucket_embeddings(crawl, bucket, layout), img, txt, meta)
        _, _, stored = embeddings.read_embeddings(store, manifest.files)  # checks the three files belong together
        metadata = to_metadata(report.metadata())
        metadata.update({"model": chosen.embed.name, "dim": manifest.dim,
                         "dagster/uri": store.uri(paths.embeddings(crawl, layout)), "dagster/row_count": manifest.rows})
        aligned = manifest.rows == stored.num_rows == len(keep) - report.failed
        return dg.MaterializeResult(value=manifest, metadata=metadata, check_results=[
            checks.holds("image_embeddings", "row_aligned", aligned,
                         f"{manifest.rows} rows of embeddings and metadata for {len(keep)} kept samples "
                         f"({report.failed} failed to decode)")])

    return image_embeddings


def safety_scores_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=op_tags("safety_scores", ops),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "parquet"}, group_name="clip",
              code_version=CODE_VERSION, automation_condition=REPROCESS, deps=["safety_model"],
              check_specs=[checks.spec("safety_scores", "schema", "key, model, punsafe, unsafe"),
                           checks.spec("safety_scores", "one_row_per_embedding", "a row for every embedded sample")])
    def safety_scores(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelRegistryResource,
                      image_embeddings: EmbeddingsManifest):
        """punsafe of every embedded sample from the safety head on its image embedding (unsafe above 0.5)."""
        from laion_assets.core.clip import embeddings, safety

        store = storage.get()
        chosen = models.model_set(context.log.info)
        if not chosen.safety_head:
            raise dg.Failure("no safety head configured (ModelRegistryResource.safety_head)")
        img, _, meta = embeddings.read_embeddings(store, image_embeddings.files)
        head, card = safety.load_safety_head(chosen.safety_head)
        name = card.get("name", chosen.safety_head)
        try:
            table = safety.safety_table(meta["key"], img, head, name, chosen.safety_threshold)
        except safety.SafetyDimensionError as err:
            raise dg.Failure(f"{err} ({chosen.embed.name})") from err
        unsafe = sum(table["unsafe"].to_pylist())
        return dg.MaterializeResult(value=table, metadata={
            "samples": table.num_rows, "unsafe": unsafe, "model": name,
            "unsafe_fraction": round(unsafe / table.num_rows, 4) if table.num_rows else 0.0}, check_results=[
            checks.schema("safety_scores", table.schema, safety.SAFETY_SCHEMA),
            checks.holds("safety_scores", "one_row_per_embedding", table.num_rows == image_embeddings.rows,
                         f"{table.num_rows} rows for {image_embeddings.rows} embeddings")])

    return safety_scores


def watermark_scores_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=op_tags("watermark_scores", ops),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "parquet"}, group_name="clip",
              pool="gpu", code_version=CODE_VERSION, automation_condition=REPROCESS, deps=["watermark_model"],
              check_specs=[checks.spec("watermark_scores", "schema", "key, model, pwatermark, watermark, status"),
                           checks.spec("watermark_scores", "one_row_per_kept", "a row for every kept sample")])
    def watermark_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelRegistryResource, image_shards: ShardsManifest,
                         clip_scores: pa.Table):
        """pwatermark of every kept sample from the watermark classifier on its image (watermark above 0.8)."""
        from laion_assets.core.clip import scores, watermark

        chosen = models.model_set(context.log.info)
        keep = scores.kept_keys(clip_scores)
        table, report = watermark.watermark_bucket(storage.get(), image_shards, keep, chosen.watermark,
                                                   models.settings(), throttled(context.log.info))
        return dg.MaterializeResult(value=table, metadata={**to_metadata(report), "model": chosen.watermark.name},
                                    check_results=[
            checks.schema("watermark_scores", table.schema, watermark.WATERMARK_SCHEMA),
            checks.holds("watermark_scores", "one_row_per_kept", table.num_rows == len(keep),
                         f"{table.num_rows} rows for {len(keep)} kept samples")])

    return watermark_scores


def build_clip_assets(layout: Layout, ops: OperationsSettings) -> list[dg.AssetsDefinition]:
    return [clip_scores_asset(layout, ops), image_embeddings_asset(layout, ops), safety_scores_asset(layout, ops),
            watermark_scores_asset(layout, ops)]
