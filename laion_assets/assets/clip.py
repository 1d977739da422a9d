"""The CLIP stage: similarity filtering, ViT-L/14 embeddings, safety and watermark scores per crawl x bucket."""

import dagster as dg

from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.clip import embeddings, safety, scores, watermark
from laion_assets.core.paths import Layout
from laion_assets.core.settings import ClipSettings
from laion_assets.partitions import bucket_partitions, crawl_and_bucket
from laion_assets.resources import ModelRegistryResource, StorageResource

ScoreConfig = config_class("ScoreConfig", ClipSettings, doc="How clip_scores treats a bucket scored before.")
SCORE_PREVIEW = ["key", "language", "model", "similarity", "keep", "caption"]


def _kept(store, crawl: str, bucket: str, layout: Layout) -> frozenset[str]:
    return scores.kept_keys(store.read_parquet(paths.clip_scores(crawl, bucket, layout), columns=["key", "keep"]))


def clip_scores_asset(layout: Layout, image_shards: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), deps=[image_shards], kinds={"pytorch", "parquet"},
              group_name="clip", pool="gpu")
    def clip_scores(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                    models: ModelRegistryResource) -> dg.MaterializeResult:
        """Image-caption cosine similarity of every downloaded sample (English captions: the English CLIP;
        other and undetected languages: the multilingual CLIP), the model and threshold used, and keep."""
        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        out = paths.clip_scores(crawl, bucket, layout)
        chosen = models.model_set(context.log.info)
        previous = store.read_parquet(out) if store.exists(out) else None
        table, report = scores.score_bucket(store, paths.image_shards(crawl, bucket, layout), chosen,
                                            models.settings(), previous, config.reuse_similarities, context.log.debug)
        store.write_parquet(out, table)
        context.log.info(f"{crawl} bucket {bucket}: {report.samples} samples, {report.kept} kept"
                         + (" (re-filtered stored similarities)" if report.refiltered_only else ""))
        metadata = to_metadata(report.metadata())
        metadata.update({
            "thresholds": dg.MetadataValue.json({s.name: s.threshold for s in (chosen.clip_en, chosen.clip_multi)}),
            "similarity_histogram": dg.MetadataValue.json(scores.similarity_histogram(table)),
            "preview": preview_table(table.slice(0, 8).to_pylist(), SCORE_PREVIEW),
            "dagster/uri": store.uri(out), "dagster/row_count": table.num_rows})
        return dg.MaterializeResult(metadata=metadata)

    return clip_scores


def image_embeddings_asset(layout: Layout, clip_scores: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), deps=[clip_scores], kinds={"pytorch", "numpy"},
              group_name="clip", pool="gpu")
    def image_embeddings(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelRegistryResource) -> dg.MaterializeResult:
        """L2-normalized image and text embeddings (ViT-L/14; float16) of the kept samples, in clip-retrieval's
        layout: img_emb/img_emb_{bucket}.npy, text_emb/text_emb_{bucket}.npy, metadata/metadata_{bucket}.parquet."""
        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        chosen = models.model_set(context.log.info)
        img, txt, meta, report = embeddings.embed_bucket(
            store, paths.image_shards(crawl, bucket, layout), _kept(store, crawl, bucket, layout), chosen.embed,
            models.settings(), context.log.debug)
        keys = paths.bucket_embeddings(crawl, bucket, layout)
        embeddings.write_embeddings(store, keys, img, txt, meta)
        metadata = to_metadata(report.metadata())
        metadata.update({"model": chosen.embed.name, "dim": int(img.shape[1]),
                         "dagster/uri": store.uri(paths.embeddings(crawl, layout)),
                         "dagster/row_count": int(img.shape[0])})
        return dg.MaterializeResult(metadata=metadata)

    return image_embeddings


def safety_scores_asset(layout: Layout, image_embeddings: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), deps=[image_embeddings], kinds={"pytorch", "parquet"},
              group_name="clip")
    def safety_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                      models: ModelRegistryResource) -> dg.MaterializeResult:
        """punsafe of every embedded sample from the safety head on its image embedding (unsafe above 0.5)."""
        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        chosen = models.model_set(context.log.info)
        if not chosen.safety_head:
            raise dg.Failure("no safety head configured (ModelRegistryResource.safety_head)")
        img, _, meta = embeddings.read_embeddings(store, paths.bucket_embeddings(crawl, bucket, layout))
        head, card = safety.load_safety_head(chosen.safety_head)
        name = card.get("name", chosen.safety_head)
        try:
            table = safety.safety_table(meta["key"], img, head, name, chosen.safety_threshold)
        except safety.SafetyDimensionError as err:
            raise dg.Failure(f"{err} ({chosen.embed.name})") from err
        out = paths.safety_scores(crawl, bucket, layout)
        store.write_parquet(out, table)
        unsafe = sum(table["unsafe"].to_pylist())
        return dg.MaterializeResult(metadata={
            "samples": table.num_rows, "unsafe": unsafe,
            "unsafe_fraction": round(unsafe / table.num_rows, 4) if table.num_rows else 0.0, "model": name,
            "dagster/uri": store.uri(out), "dagster/row_count": table.num_rows})

    return safety_scores


def watermark_scores_asset(layout: Layout, clip_scores: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=bucket_partitions(layout), deps=[clip_scores], kinds={"pytorch", "parquet"},
              group_name="clip", pool="gpu")
    def watermark_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelRegistryResource) -> dg.MaterializeResult:
        """pwatermark of every kept sample from the watermark classifier on its image (watermark above 0.8)."""
        crawl, bucket = crawl_and_bucket(context)
        store = storage.get()
        chosen = models.model_set(context.log.info)
        table, report = watermark.watermark_bucket(
            store, paths.image_shards(crawl, bucket, layout), _kept(store, crawl, bucket, layout), chosen.watermark,
            models.settings(), context.log.debug)
        out = paths.watermark_scores(crawl, bucket, layout)
        store.write_parquet(out, table)
        return dg.MaterializeResult(metadata={**to_metadata(report), "model": chosen.watermark.name,
                                              "dagster/uri": store.uri(out), "dagster/row_count": table.num_rows})

    return watermark_scores


def build_clip_assets(layout: Layout, image_shards: dg.AssetsDefinition) -> list[dg.AssetsDefinition]:
    clip_scores = clip_scores_asset(layout, image_shards)
    image_embeddings = image_embeddings_asset(layout, clip_scores)
    return [clip_scores, image_embeddings, safety_scores_asset(layout, image_embeddings),
            watermark_scores_asset(layout, clip_scores)]
