"""The CLIP stage: similarity filtering, ViT-L/14 embeddings, safety and watermark scores per crawl x bucket.

clip_scores, image_embeddings and watermark_scores are one op (`clip_pass`) that reads each shard once and decodes
each image once for all of them (core/clip/stage.py); it can run for any subset of the three.

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

CODE_VERSION = "3"
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


def _selected(context: dg.AssetExecutionContext, results: list) -> list:
    """The check results of the checks this run selected (a subset run selects those of its assets)."""
    chosen = context.selected_asset_check_keys
    return [r for r in results if dg.AssetCheckKey(dg.AssetKey(r.asset_key.path), r.check_name) in chosen]


def _score_result(context: dg.AssetExecutionContext, table: pa.Table, report, chosen, successes: int,
                  bands) -> dg.MaterializeResult:
    from laion_assets.core.clip import scores

    crawl, bucket = crawl_and_bucket(context)
    context.log.info(f"{crawl} bucket {bucket}: {report.samples} samples, {report.kept} kept"
                     + (" (re-filtered stored similarities)" if report.refiltered_only else ""))
    metadata = to_metadata(report.metadata())
    metadata.update({
        "thresholds": dg.MetadataValue.json({s.name: s.threshold for s in (chosen.clip_en, chosen.clip_multi)}),
        "similarity_histogram": dg.MetadataValue.json(scores.similarity_histogram(table)),
        "preview": preview_table(table.slice(0, 8).to_pylist(), SCORE_PREVIEW)})
    return dg.MaterializeResult(asset_key="clip_scores", value=table, metadata=metadata, check_results=_selected(
        context, [
            checks.schema("clip_scores", table.schema, scores.SCORE_SCHEMA),
            checks.holds("clip_scores", "one_row_per_image", table.num_rows == successes,
                         f"{table.num_rows} rows for {successes} downloaded images"),
            checks.band("clip_scores", "kept_fraction", report.kept / max(1, report.samples),
                        bands.min_kept_fraction, bands.max_kept_fraction, "kept fraction")]))


def _embedding_result(context: dg.AssetExecutionContext, store, layout: Layout, embedded, keep: frozenset[str],
                      model_name: str) -> dg.MaterializeResult:
    from laion_assets.core.clip import embeddings

    crawl, bucket = crawl_and_bucket(context)
    img, txt, meta, report = embedded
    manifest = embeddings.write_embeddings(store, paths.bucket_embeddings(crawl, bucket, layout), img, txt, meta)
    _, _, stored = embeddings.read_embeddings(store, manifest.files)  # checks the three files belong together
    metadata = to_metadata(report.metadata())
    metadata.update({"model": model_name, "dim": manifest.dim,
                     "dagster/uri": store.uri(paths.embeddings(crawl, layout)), "dagster/row_count": manifest.rows})
    aligned = manifest.rows == stored.num_rows == len(keep) - report.failed
    return dg.MaterializeResult(asset_key="image_embeddings", value=manifest, metadata=metadata,
                                check_results=_selected(context, [
        checks.holds("image_embeddings", "row_aligned", aligned,
                     f"{manifest.rows} rows of embeddings and metadata for {len(keep)} kept samples "
                     f"({report.failed} failed to decode)")]))


def _watermark_result(context: dg.AssetExecutionContext, marked, keep: frozenset[str], model_name: str
                      ) -> dg.MaterializeResult:
    from laion_assets.core.clip import watermark

    table, report = marked
    return dg.MaterializeResult(asset_key="watermark_scores", value=table,
                                metadata={**to_metadata(report), "model": model_name},
                                check_results=_selected(context, [
        checks.schema("watermark_scores", table.schema, watermark.WATERMARK_SCHEMA),
        checks.holds("watermark_scores", "one_row_per_kept", table.num_rows == len(keep),
                     f"{table.num_rows} rows for {len(keep)} kept samples")]))


def clip_pass_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    """clip_scores, image_embeddings and watermark_scores as one op that reads each shard once and decodes each
    image once for all three; any subset of them can be materialized (a new watermark model re-runs
    watermark_scores alone, a new threshold re-filters clip_scores, and its dependants follow)."""
    partitions = bucket_partitions(layout)
    common = {"group_name": "clip", "code_version": CODE_VERSION, "automation_condition": REPROCESS}
    def out(kinds: set[str], description: str) -> dg.AssetOut:
        return dg.AssetOut(kinds=kinds, description=description, is_required=False, **common)

    outs = {
        "clip_scores": out({"pytorch", "parquet"},
                           "Image-caption cosine similarity of every downloaded sample (English captions: the English "
                           "CLIP; other and undetected languages: the multilingual CLIP), the model and threshold "
                           "used, and keep."),
        "image_embeddings": out({"pytorch", "numpy"},
                                "L2-normalized image and text embeddings (ViT-L/14; float16) of the kept samples, in "
                                "clip-retrieval's layout: img_emb/img_emb_{bucket}.npy, "
                                "text_emb/text_emb_{bucket}.npy, metadata/metadata_{bucket}.parquet."),
        "watermark_scores": out({"pytorch", "parquet"},
                                "pwatermark of every kept sample from the watermark classifier on its image "
                                "(watermark above 0.8)."),
    }
    shards, scores_key = dg.AssetKey("image_shards"), dg.AssetKey("clip_scores")
    # Each output depends on the shards and on its own model source only, so a new watermark model re-runs
    # watermark_scores alone; the two that read the kept samples depend on clip_scores.
    internal = {"clip_scores": {shards, dg.AssetKey("clip_filter_models")},
                "image_embeddings": {shards, scores_key, dg.AssetKey("embedding_model")},
                "watermark_scores": {shards, scores_key, dg.AssetKey("watermark_model")}}
    check_specs = [
        checks.spec("clip_scores", "schema", "the score columns"),
        checks.spec("clip_scores", "one_row_per_image", "a row for every downloaded image"),
        checks.spec("clip_scores", "kept_fraction", "kept fraction in its band", blocking=False),
        checks.spec("image_embeddings", "row_aligned",
                    "image and text arrays and metadata have one row per kept sample"),
        checks.spec("watermark_scores", "schema", "key, model, pwatermark, watermark, status"),
        checks.spec("watermark_scores", "one_row_per_kept", "a row for every kept sample"),
    ]

    @dg.multi_asset(name="clip_pass", outs=outs, check_specs=check_specs, can_subset=True, partitions_def=partitions,
                    ins={"image_shards": dg.AssetIn("image_shards")}, internal_asset_deps=internal,
                    deps=["clip_filter_models", "embedding_model", "watermark_model"],
                    op_tags=op_tags("clip_scores", ops), pool="gpu")
    def clip_pass(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                  models: ModelRegistryResource, check_bands: ChecksResource, image_shards: ShardsManifest):
        from laion_assets.core.clip import stage

        crawl, bucket = crawl_and_bucket(context)
        want = {k.to_user_string() for k in context.selected_asset_keys}
        store = storage.get()
        own = paths.clip_scores(crawl, bucket, layout)  # this op's stored output: reused, or what is kept
        chosen = models.model_set(context.log.info)
        stored = store.read_parquet(own) if store.exists(own) else None
        try:
            out = stage.clip_bucket(store, image_shards, chosen, models.settings(), want, stored,
                                    config.reuse_similarities, throttled(context.log.info))
        except stage.MissingScoresError as err:
            raise dg.Failure(f"{crawl} bucket {bucket}: {err}") from err
        context.log.info(f"{crawl} bucket {bucket}: {', '.join(sorted(want))} in one pass"
                         + (f" ({out.decode_path} decoding)" if out.decode_path else ""))
        if out.scores is not None:
            yield _score_result(context, out.scores, out.score_report, chosen, image_shards.statuses.get("success", 0),
                                check_bands.settings())
        if out.embeddings is not None:
            yield _embedding_result(context, store, layout, out.embeddings, out.kept, chosen.embed.name)
        if out.watermark is not None:
            yield _watermark_result(context, out.watermark, out.kept, chosen.watermark.name)

    return clip_pass


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


def build_clip_assets(layout: Layout, ops: OperationsSettings) -> list[dg.AssetsDefinition]:
    return [clip_pass_asset(layout, ops), safety_scores_asset(layout, ops)]
