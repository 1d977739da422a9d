"""The CLIP stage: similarity filtering, ViT-L/14 embeddings, safety, aesthetic and watermark scores per crawl x
bucket.

clip_scores, image_embeddings and watermark_scores are one op (`clip_pass`) that reads each shard once and decodes
each image once for all of them (`core/clip/stage.py`); it can run for any subset of the three.

Each asset depends on the model registry source it uses (the filter CLIPs and thresholds, the embedding model,
the safety head, the watermark classifier): a new data version there (a new checkpoint, a changed threshold)
re-runs it and what follows. A threshold change re-filters the stored similarities without rescoring. The core
(torch) is imported inside the asset bodies, so that loading the code location stays fast.
"""

import dagster as dg

from laion_assets import k8s, tags
from laion_assets.assets import checks
from laion_assets.assets.download import IMAGE_SHARDS
from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.automation import REPROCESS, versioned_sources
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.clip.parts import Part
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.paths import Layout
from laion_assets.core.progress import throttled
from laion_assets.core.settings import ClipSettings, OperationsSettings
from laion_assets.io_manager import stored_key
from laion_assets.partitions import bucket_partitions, crawl_and_bucket
from laion_assets.resources import ChecksResource, ModelRegistryResource, StorageResource

CODE_VERSION = "3"
ScoreConfig = config_class("ScoreConfig", ClipSettings, doc="How clip_scores treats a bucket scored before.")
SCORE_PREVIEW = ["key", "language", "model", "similarity", "keep", "caption"]
# The model registry's sources, each the data version of one part of the registry (core/clip/registry.py PARTS).
MODEL_SOURCES = {
    "clip_filter_models": ("filter", "The English and multilingual CLIPs and their thresholds (data version: weights "
                                     "and thresholds)."),
    "embedding_model": ("embed", "The CLIP whose embeddings are stored (ViT-L/14 in LAION)."),
    "safety_model": ("safety", "The safety head, its threshold and the concept filter's file."),
    "watermark_model": ("watermark", "The watermark classifier and its threshold."),
    "aesthetic_model": ("aesthetic", "The aesthetic head (LAION-Aesthetics V2 in LAION)."),
}
FILTER_MODELS, EMBEDDING_MODEL, SAFETY_MODEL, WATERMARK_MODEL, AESTHETIC_MODEL = (dg.AssetKey(n)
                                                                                 for n in MODEL_SOURCES)
CLIP_SCORES, IMAGE_EMBEDDINGS, WATERMARK_SCORES = (dg.AssetKey(n) for n in
                                                   ("clip_scores", "image_embeddings", "watermark_scores"))
SAFETY_SCORES, AESTHETIC_SCORES = dg.AssetKey("safety_scores"), dg.AssetKey("aesthetic_scores")


def model_sources(ops: OperationsSettings) -> tuple[list, dg.SensorDefinition]:
    def versions(models: ModelRegistryResource) -> dict[str, str]:
        parts = models.versions()
        return {name: parts[part] for name, (part, _) in MODEL_SOURCES.items()}

    return versioned_sources({n: d for n, (_, d) in MODEL_SOURCES.items()}, "models", versions, "models",
                             ops.sensor_interval_s)


def _selected(context: dg.AssetExecutionContext, results: list) -> list:
    """The check results of the checks this run selected (a subset run selects those of its assets)."""
    chosen = context.selected_asset_check_keys
    return [r for r in results if dg.AssetCheckKey(dg.AssetKey(r.asset_key.path), r.check_name) in chosen]


def _score_result(context: dg.AssetExecutionContext, out, chosen, successes: int, bands) -> dg.MaterializeResult:
    from laion_assets.core.clip import scores

    crawl, bucket = crawl_and_bucket(context)
    table, report, asset = out.scores, out.score_report, CLIP_SCORES.to_user_string()
    context.log.info(f"{crawl} bucket {bucket}: {report.samples} samples, {report.kept} kept"
                     + (" (re-filtered stored similarities)" if report.refiltered_only else ""))
    metadata = to_metadata(report.metadata())
    metadata.update({
        "thresholds": dg.MetadataValue.json({s.name: s.threshold for s in (chosen.clip_en, chosen.clip_multi)}),
        "similarity_histogram": dg.MetadataValue.json(scores.similarity_histogram(table)),
        "preview": preview_table(table.slice(0, 8).to_pylist(), SCORE_PREVIEW)})
    return dg.MaterializeResult(asset_key=CLIP_SCORES, value=table, metadata=metadata, check_results=_selected(
        context, [
            checks.schema(asset, table.schema, scores.SCORE_SCHEMA),
            checks.holds(asset, "one_row_per_image", table.num_rows == successes,
                         f"{table.num_rows} rows for {successes} downloaded images"),
            checks.band(asset, "kept_fraction", report.kept / max(1, report.samples),
                        bands.min_kept_fraction, bands.max_kept_fraction, "kept fraction")]))


def _embedding_result(context: dg.AssetExecutionContext, store, layout: Layout, out, model_name: str
                      ) -> dg.MaterializeResult:
    manifest, report = out.embeddings, out.embed_report
    metadata = to_metadata(report.metadata())
    metadata.update({"model": model_name, "dim": manifest.dim,
                     "dagster/uri": store.uri(paths.embeddings(crawl_and_bucket(context)[0], layout)),
                     "dagster/row_count": manifest.rows})
    aligned = manifest.rows == out.stored_rows == len(out.kept) - report.failed
    return dg.MaterializeResult(asset_key=IMAGE_EMBEDDINGS, value=manifest, metadata=metadata,
                                check_results=_selected(context, [
        checks.holds(IMAGE_EMBEDDINGS.to_user_string(), "row_aligned", aligned,
                     f"{manifest.rows} rows of embeddings and metadata for {len(out.kept)} kept samples "
                     f"({report.failed} failed to decode)")]))


def _watermark_result(context: dg.AssetExecutionContext, out, model_name: str) -> dg.MaterializeResult:
    from laion_assets.core.clip import watermark

    table, asset = out.watermark, WATERMARK_SCORES.to_user_string()
    return dg.MaterializeResult(asset_key=WATERMARK_SCORES, value=table,
                                metadata={**to_metadata(out.watermark_report), "model": model_name},
                                check_results=_selected(context, [
        checks.schema(asset, table.schema, watermark.WATERMARK_SCHEMA),
        checks.holds(asset, "one_row_per_kept", table.num_rows == len(out.kept),
                     f"{table.num_rows} rows for {len(out.kept)} kept samples")]))


def clip_pass_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    """clip_scores, image_embeddings and watermark_scores as one op that reads each shard once and decodes each
    image once for all three; any subset of them can be materialized (a new watermark model re-runs
    watermark_scores alone, a new threshold re-filters clip_scores, and its dependants follow)."""
    common = {"group_name": "clip", "code_version": CODE_VERSION, "automation_condition": REPROCESS,
              "tags": tags.stage("clip")}

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
    parts = {CLIP_SCORES: Part.SCORES, IMAGE_EMBEDDINGS: Part.EMBEDDINGS, WATERMARK_SCORES: Part.WATERMARK}
    # Each output depends on the shards and on its own model source only, so a new watermark model re-runs
    # watermark_scores alone; the two that read the kept samples depend on clip_scores.
    internal = {"clip_scores": {IMAGE_SHARDS, FILTER_MODELS},
                "image_embeddings": {IMAGE_SHARDS, CLIP_SCORES, EMBEDDING_MODEL},
                "watermark_scores": {IMAGE_SHARDS, CLIP_SCORES, WATERMARK_MODEL}}
    check_specs = [
        checks.spec("clip_scores", "schema", "the score columns"),
        checks.spec("clip_scores", "one_row_per_image", "a row for every downloaded image"),
        checks.spec("clip_scores", "kept_fraction", "kept fraction in its band", blocking=False),
        checks.spec("image_embeddings", "row_aligned",
                    "image and text arrays and metadata have one row per kept sample"),
        checks.spec("watermark_scores", "schema", "key, model, pwatermark, watermark, status"),
        checks.spec("watermark_scores", "one_row_per_kept", "a row for every kept sample"),
    ]

    @dg.multi_asset(name="clip_pass", outs=outs, check_specs=check_specs, can_subset=True,
                    partitions_def=bucket_partitions(layout), ins={"image_shards": dg.AssetIn(IMAGE_SHARDS)},
                    internal_asset_deps=internal, deps=[FILTER_MODELS, EMBEDDING_MODEL, WATERMARK_MODEL],
                    op_tags=k8s.gpu_pod(ops), pool="gpu")
    def clip_pass(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                  models: ModelRegistryResource, check_bands: ChecksResource, image_shards: ShardsManifest):
        from laion_assets.core.clip import stage

        crawl, bucket = crawl_and_bucket(context)
        want = {parts[k] for k in context.selected_asset_keys}
        store = storage.get()
        # This op's own stored scores: re-filtered, or the kept samples of a run that does not rescore.
        own = stored_key(CLIP_SCORES, {"crawl": crawl, "bucket": bucket}, layout)
        chosen = models.model_set(["watermark"] if Part.WATERMARK in want else [])
        try:
            out = stage.run(store, image_shards, chosen, models.settings(), want,
                            store.read_parquet(own) if store.exists(own) else None,
                            (store, paths.bucket_embeddings(crawl, bucket, layout)), config.reuse_similarities,
                            throttled(context.log.info))
        except stage.MissingScoresError as err:
            raise dg.Failure(f"{crawl} bucket {bucket}: {err}") from err
        context.log.info(f"{crawl} bucket {bucket}: {', '.join(sorted(want))} in one pass"
                         + (f" ({out.decode_path} decoding)" if out.decode_path else ""))
        if out.scores is not None:
            yield _score_result(context, out, chosen, image_shards.statuses.get("success", 0), check_bands.settings())
        if out.embeddings is not None:
            yield _embedding_result(context, store, layout, out, chosen.embed.name)
        if out.watermark is not None:
            yield _watermark_result(context, out, chosen.watermark.name)

    return clip_pass


def safety_scores_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=k8s.cpu_pod(memory="8Gi"), tags=tags.stage("clip"),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "parquet"}, group_name="clip",
              code_version=CODE_VERSION, automation_condition=REPROCESS, deps=[SAFETY_MODEL],
              ins={"image_embeddings": dg.AssetIn(IMAGE_EMBEDDINGS)},
              check_specs=[checks.spec("safety_scores", "schema",
                                       "key, model, punsafe, unsafe (and the concept filter's columns)"),
                           checks.spec("safety_scores", "one_row_per_embedding", "a row for every embedded sample")])
    def safety_scores(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelRegistryResource,
                      image_embeddings: EmbeddingsManifest):
        """punsafe of every embedded sample from the safety head on its image embedding (unsafe above 0.5), and
        the concept filter's similarities and verdict (concept_filtered samples leave filtered_metadata)."""
        from laion_assets.core.clip import safety
        from laion_assets.core.clip.heads import HeadError

        chosen = models.model_set(("safety_head", "concepts"))
        try:
            table, report = safety.run(storage.get(), image_embeddings.files, chosen, image_embeddings.dim,
                                       context.log.info)
        except (safety.NoSafetyHead, safety.SafetyDimensionError, HeadError) as err:
            raise dg.Failure(str(err)) from err
        return dg.MaterializeResult(value=table, metadata=report, check_results=[
            checks.schema("safety_scores", table.schema, safety.safety_schema(bool(chosen.concepts))),
            checks.holds("safety_scores", "one_row_per_embedding", table.num_rows == image_embeddings.rows,
                         f"{table.num_rows} rows for {image_embeddings.rows} embeddings")])

    return safety_scores


def aesthetic_scores_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(op_tags=k8s.cpu_pod(memory="8Gi"), tags=tags.stage("clip"),
              partitions_def=bucket_partitions(layout), kinds={"pytorch", "parquet"}, group_name="clip",
              code_version=CODE_VERSION, automation_condition=REPROCESS, deps=[AESTHETIC_MODEL],
              ins={"image_embeddings": dg.AssetIn(IMAGE_EMBEDDINGS)},
              check_specs=[checks.spec("aesthetic_scores", "schema", "key, model, aesthetic"),
                           checks.spec("aesthetic_scores", "one_row_per_embedding", "a row for every embedded sample")])
    def aesthetic_scores(storage: StorageResource, models: ModelRegistryResource,
                         image_embeddings: EmbeddingsManifest):
        """The aesthetic score of every embedded sample (LAION-Aesthetics V2 on the L2-normalised image embedding:
        about 1..10; the LAION-Aesthetics subsets are >= 4.5, 5, 6 and 6.5)."""
        from laion_assets.core.clip import aesthetic
        from laion_assets.core.clip.heads import HeadDimensionError, HeadError

        try:
            table, report = aesthetic.run(storage.get(), image_embeddings.files, models.model_set(("aesthetic_head",)),
                                          image_embeddings.dim)
        except (aesthetic.NoAestheticHead, HeadDimensionError, HeadError) as err:
            raise dg.Failure(str(err)) from err
        return dg.MaterializeResult(value=table, metadata=report, check_results=[
            checks.schema("aesthetic_scores", table.schema, aesthetic.AESTHETIC_SCHEMA),
            checks.holds("aesthetic_scores", "one_row_per_embedding", table.num_rows == image_embeddings.rows,
                         f"{table.num_rows} rows for {image_embeddings.rows} embeddings")])

    return aesthetic_scores


def build_clip_assets(layout: Layout, ops: OperationsSettings) -> list[dg.AssetsDefinition]:
    return [clip_pass_asset(layout, ops), safety_scores_asset(layout, ops), aesthetic_scores_asset(layout, ops)]

