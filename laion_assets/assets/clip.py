"""The CLIP stage: similarity filtering, ViT-L/14 embeddings, safety and watermark scores per crawl x bucket."""


import io

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.assets.images import image_shards_prefix
from laion_assets.assets.metadata import preview_table, to_metadata
from laion_assets.partitions import Layout, crawl_of, dimension
from laion_assets.resources import ModelRegistryResource, StorageResource


def stage_key(crawl: str, what: str, bucket: str, n_buckets: int) -> str:
    return f"crawls/{crawl}/{what}/buckets={n_buckets}/bucket={bucket}.parquet"


def embeddings_prefix(crawl: str, n_buckets: int) -> str:
    """clip-retrieval's layout for the whole crawl: img_emb/img_emb_{bucket}.npy and friends."""
    return f"crawls/{crawl}/embeddings/buckets={n_buckets}"


def _write_parquet(store, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes(key, buf.getvalue())


def _read_parquet(store, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(key)))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


class ScoreConfig(dg.Config):
    # When the bucket was scored before with the same models and its downloads have not changed since, only
    # the keep flags are recomputed from the stored similarities (a threshold change re-filters without
    # touching an image).
    reuse_similarities: bool = True


def build_clip_assets(layout: Layout, image_shards: dg.AssetsDefinition) -> list[dg.AssetsDefinition]:
    parts = layout.bucket_partitions()

    def tars(context: dg.AssetExecutionContext, store) -> tuple[list[str], str, str]:
        crawl, bucket = crawl_of(context), dimension(context, "bucket")
        keys = [k for k in store.list(image_shards_prefix(crawl, bucket, layout.buckets)) if k.endswith(".tar")]
        if not keys:
            raise dg.Failure(f"no image shards for {crawl} bucket {bucket}: materialize image_shards first")
        return keys, crawl, bucket

    def downloaded_keys(store, crawl: str, bucket: str) -> list[str]:
        """Keys of the bucket's successful downloads, sorted: what a valid clip_scores table covers."""
        prefix = image_shards_prefix(crawl, bucket, layout.buckets)
        rows = [k for k in store.list(prefix) if k.endswith(".parquet")]
        keys: list[str] = []
        with store.local_copies(rows) as paths:
            for path in paths:
                t = pq.read_table(path, columns=["key", "status"])
                keys += [k for k, st in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
                         if st == "success"]
        return sorted(keys)

    def kept_keys(store, crawl: str, bucket: str) -> frozenset[str]:
        scores = _read_parquet(store, stage_key(crawl, "clip_scores", bucket, layout.buckets))
        return frozenset(k for k, kept in zip(scores["key"].to_pylist(), scores["keep"].to_pylist(), strict=True)
                         if kept)

    @dg.asset(partitions_def=parts, deps=[image_shards], kinds={"pytorch", "parquet"}, group_name="clip",
              pool="gpu")
    def clip_scores(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                    models: ModelRegistryResource) -> dg.MaterializeResult:
        """Image-caption cosine similarity of every downloaded sample (English captions: the English CLIP;
        other and undetected languages: the multilingual CLIP), the model and threshold used, and keep."""
        from laion_assets.core import clip

        store = storage.get()
        keys, crawl, bucket = tars(context, store)
        out = stage_key(crawl, "clip_scores", bucket, layout.buckets)
        chosen = models.model_set(context.log.info)
        thresholds = {m.name: m.threshold for m in (chosen.clip_en, chosen.clip_multi)}
        if config.reuse_similarities and store.exists(out):
            old = _read_parquet(store, out)
            same_models = set(old["model"].to_pylist()) <= set(thresholds)
            if same_models and old["key"].to_pylist() == downloaded_keys(store, crawl, bucket):
                table = clip.refilter(old, thresholds)
                _write_parquet(store, out, table)
                kept = sum(table["keep"].to_pylist())
                context.log.info(f"re-filtered {table.num_rows} stored similarities: {kept} kept")
                return dg.MaterializeResult(metadata={
                    "samples": table.num_rows, "kept": kept, "refiltered_only": True,
                    "thresholds": dg.MetadataValue.json(thresholds), "dagster/uri": store.uri(out),
                    "dagster/row_count": table.num_rows})
        device = models.torch_device()
        english = clip.load_clip(chosen.clip_en, device)
        multilingual = clip.load_clip(chosen.clip_multi, device)
        with store.local_copies(keys) as paths:
            table, report = clip.score_shards(paths, english, multilingual, models.batch_size, models.decode_workers,
                                              context.log.debug)
        _write_parquet(store, out, table)
        context.log.info(f"{crawl} bucket {bucket}: {report.samples} scored, {report.kept} kept on {device}")
        sims = np.array([s for s in table["similarity"].to_pylist() if s is not None], dtype=np.float32)
        metadata = to_metadata(report.metadata())
        metadata.update({
            "device": str(device), "thresholds": dg.MetadataValue.json(thresholds),
            "similarity_histogram": dg.MetadataValue.json(
                dict(zip([f"{e:.2f}" for e in np.histogram(sims, bins=10)[1][:-1]],
                         np.histogram(sims, bins=10)[0].tolist(), strict=True)) if len(sims) else {}),
            "preview": preview_table(table.slice(0, 8).to_pylist(),
                                     ["key", "language", "model", "similarity", "keep", "caption"]),
            "dagster/uri": store.uri(out), "dagster/row_count": table.num_rows,
        })
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset(partitions_def=parts, deps=[clip_scores], kinds={"pytorch", "numpy"}, group_name="clip", pool="gpu")
    def image_embeddings(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelRegistryResource) -> dg.MaterializeResult:
        """L2-normalized image and text embeddings (ViT-L/14; float16) of the kept samples, in clip-retrieval's
        layout: img_emb/img_emb_{bucket}.npy, text_emb/text_emb_{bucket}.npy, metadata/metadata_{bucket}.parquet."""
        from laion_assets.core import clip

        store = storage.get()
        keys, crawl, bucket = tars(context, store)
        keep = kept_keys(store, crawl, bucket)
        chosen = models.model_set(context.log.info)
        device = models.torch_device()
        model = clip.load_clip(chosen.embed, device)
        with store.local_copies(keys) as paths:
            img, txt, meta, report = clip.embed_shards(paths, keep, model, models.batch_size, models.decode_workers,
                                                       context.log.debug)
        prefix = embeddings_prefix(crawl, layout.buckets)
        i = int(bucket)
        # Metadata last: its presence means the bucket's three files belong together.
        store.write_bytes(f"{prefix}/img_emb/img_emb_{i}.npy", _npy_bytes(img))
        store.write_bytes(f"{prefix}/text_emb/text_emb_{i}.npy", _npy_bytes(txt))
        meta = meta.append_column("model", pa.array([chosen.embed.name] * meta.num_rows, pa.string()))
        _write_parquet(store, f"{prefix}/metadata/metadata_{i}.parquet", meta)
        metadata = to_metadata(report.metadata())
        metadata.update({"model": chosen.embed.name, "dim": int(img.shape[1]), "device": str(device),
                         "dagster/uri": store.uri(prefix), "dagster/row_count": int(img.shape[0])})
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset(partitions_def=parts, deps=[image_embeddings], kinds={"pytorch", "parquet"}, group_name="clip")
    def safety_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                      models: ModelRegistryResource) -> dg.MaterializeResult:
        """punsafe of every embedded sample from the safety head on its image embedding (unsafe above 0.5)."""
        from laion_assets.core import tags

        store = storage.get()
        crawl, bucket = crawl_of(context), dimension(context, "bucket")
        prefix = embeddings_prefix(crawl, layout.buckets)
        i = int(bucket)
        meta = _read_parquet(store, f"{prefix}/metadata/metadata_{i}.parquet")
        img = np.load(io.BytesIO(store.read_bytes(f"{prefix}/img_emb/img_emb_{i}.npy")))
        chosen = models.model_set(context.log.info)
        if not chosen.safety_head:
            raise dg.Failure("no safety head configured (ModelRegistryResource.safety_head)")
        head, card = tags.load_safety_head(chosen.safety_head)
        if img.shape[0] and head.dim != img.shape[1]:
            raise dg.Failure(f"the safety head takes {head.dim}-d embeddings but {chosen.embed.name} gives "
                             f"{img.shape[1]}-d ones")
        scores = tags.punsafe(head, img)
        name = card.get("name", chosen.safety_head)
        table = pa.table({"key": meta["key"], "model": pa.array([name] * len(scores), pa.string()),
                          "punsafe": pa.array(scores, pa.float32()),
                          "unsafe": pa.array(scores > chosen.safety_threshold)})
        out = stage_key(crawl, "safety_scores", bucket, layout.buckets)
        _write_parquet(store, out, table)
        unsafe = int((scores > chosen.safety_threshold).sum())
        return dg.MaterializeResult(metadata={
            "samples": len(scores), "unsafe": unsafe, "unsafe_fraction": round(unsafe / len(scores), 4) if len(scores)
            else 0.0, "model": name, "dagster/uri": store.uri(out), "dagster/row_count": len(scores)})

    @dg.asset(partitions_def=parts, deps=[clip_scores], kinds={"pytorch", "parquet"}, group_name="clip", pool="gpu")
    def watermark_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                         models: ModelRegistryResource) -> dg.MaterializeResult:
        """pwatermark of every kept sample from the watermark classifier on its image (watermark above 0.8)."""
        from laion_assets.core import tags

        store = storage.get()
        keys, crawl, bucket = tars(context, store)
        keep = kept_keys(store, crawl, bucket)
        chosen = models.model_set(context.log.info)
        device = models.torch_device()
        model = tags.load_watermark(chosen.watermark, device)
        with store.local_copies(keys) as paths:
            table, report = tags.watermark_shards(paths, keep, model, chosen.watermark, device, models.batch_size,
                                                  models.decode_workers, context.log.debug)
        out = stage_key(crawl, "watermark_scores", bucket, layout.buckets)
        _write_parquet(store, out, table)
        return dg.MaterializeResult(metadata={**to_metadata(report), "model": chosen.watermark.name,
                                              "device": str(device), "dagster/uri": store.uri(out),
                                              "dagster/row_count": table.num_rows})

    return [clip_scores, image_embeddings, safety_scores, watermark_scores]
