"""A small released and indexed crawl for the decontamination and neighbour-sweep tests: rendered scenes stored as
the download stores them (sha256 of the fetched bytes, pHash of the resized image), embedded by the small CLIP,
with the download rows, the embeddings (naming their model), a release part and its manifest, and a Flat index.

Two samples in different buckets are the same picture (`TWIN`, `TWIN_COPY`: one JPEG re-encoded): near
neighbours, for the sweep."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import write_embeddings
from laion_assets.core.download.plan import ShardEntry, ShardsManifest
from laion_assets.core.download.resize import process_image
from laion_assets.core.index.build import build_index
from laion_assets.core.paths import Layout
from laion_assets.core.release.release import ReleaseManifest, ReleasePart
from laion_assets.core.settings import IndexSettings, ResizeSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render
from laion_assets_tests.index.worlds import index_metadata

CRAWL = "CC-MAIN-2099-01"
LAYOUT = Layout(chunks=2, buckets=2)
PER_BUCKET = 12
TWIN, TWIN_COPY = ("0000", "000003"), ("0001", "000005")
INDEX = IndexSettings(index_key="Flat", eval_queries=0, build_memory="1G", query_memory="256M")


@dataclass
class World:
    root: str
    store: Storage
    model_name: str
    originals: dict[str, bytes]  # "bucket/key" -> the fetched bytes
    renders: dict[str, Image.Image]  # "bucket/key" -> the picture before JPEG
    rows: dict[str, dict]  # "bucket/key" -> URL, sha256, phash
    vectors: dict[str, np.ndarray]  # "bucket/key" -> its image embedding


def embed(model, jpgs: list[bytes]) -> np.ndarray:
    pixels = [model.preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpgs]
    return model.encode_pixels(torch.stack(pixels))


def build_world(root: str, model) -> World:
    store = Storage(root)
    rng, nrng = random.Random(11), np.random.default_rng(11)
    resize = ResizeSettings()
    originals, renders, rows, vectors = {}, {}, {}, {}
    buckets, tables, release_rows = [], [], []
    twin = render(random_scene(rng), (160, 120), seed=999)
    for b in LAYOUT.bucket_keys():
        keys, urls, captions, shas, hashes, stored = [], [], [], [], [], []
        for i in range(PER_BUCKET):
            key = f"{i:06d}"
            scene = random_scene(rng)
            picture = twin if (b, key) in (TWIN, TWIN_COPY) else render(scene, (160, 120), seed=int(b) * 100 + i)
            original = jpeg_bytes(picture, quality=85 if (b, key) != TWIN_COPY else 70)
            processed = process_image(original, resize)
            url = f"http://images.example/{b}/{key}.jpg"
            keys.append(key)
            urls.append(url)
            captions.append(scene.caption("en"))
            shas.append(processed.sha256)
            hashes.append(processed.phash)
            stored.append(processed.data)
            originals[f"{b}/{key}"], renders[f"{b}/{key}"] = original, picture
            rows[f"{b}/{key}"] = {"URL": url, "sha256": processed.sha256, "phash": processed.phash}
        img = embed(model, stored)
        txt = model.encode_texts(captions)
        for key, v in zip(keys, img, strict=True):
            vectors[f"{b}/{key}"] = v.astype(np.float16).astype(np.float32)
        files = paths.bucket_embeddings(CRAWL, b, LAYOUT)
        write_embeddings(store, files, img.astype(np.float16), txt.astype(np.float16), pa.table({
            "key": keys, "url": urls, "caption": captions, "language": ["en"] * PER_BUCKET,
            "model": [model.spec.name] * PER_BUCKET}))
        buckets.append(files)
        # The download: one shard whose rows carry each sample's sha256 and pHash.
        prefix = paths.image_shards(CRAWL, b, LAYOUT)
        shard = paths.shard(prefix, "00000")
        store.write_parquet(shard.rows, pa.table({"key": keys, "url": urls, "status": ["success"] * PER_BUCKET,
                                                  "sha256": shas, "phash": hashes}))
        entry = ShardEntry("00000", "00000.tar", "00000.parquet", "00000_stats.json", PER_BUCKET, PER_BUCKET)
        store.write_bytes(paths.shards_manifest(prefix), ShardsManifest(
            prefix, PER_BUCKET, "", {"success": PER_BUCKET}, [entry]).to_json())
        table = index_metadata(keys, urls, captions, nrng)
        tables.append(table.append_column("sha256", pa.array(shas)).append_column("phash", pa.array(hashes)))
        release_rows.append(pa.table({"URL": urls, "key": keys, "sha256": shas, "phash": hashes}))
    build_index(store, buckets, pa.concat_tables(tables), store.uri(paths.knn_index(CRAWL)), INDEX)
    part = paths.release_part_name("en", 0)
    store.write_parquet(paths.join(paths.release(CRAWL), part), pa.concat_tables(release_rows))
    rows_total = PER_BUCKET * LAYOUT.buckets
    manifest = ReleaseManifest(CRAWL, {"en": rows_total}, [ReleasePart("en", part, rows_total, 0, "")], {}, "", {},
                               {}, {}, {}, "1", "2099-01-01T00:00:00+00:00", LAYOUT.bucket_keys())
    store.write_bytes(paths.release_manifest(CRAWL), manifest.to_json())
    return World(root, store, model.spec.name, originals, renders, rows, vectors)
