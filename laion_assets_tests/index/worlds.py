"""Small real indices for the index and service tests: clip-retrieval embedding folders written by the CLIP stage's
own writer, from a Gaussian mixture (core tests) or from the small CLIP over rendered scenes (service tests)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import write_embeddings
from laion_assets.core.paths import EmbeddingKeys, Layout
from laion_assets.core.storage import Storage

LAYOUT = Layout(chunks=2, buckets=3)


def index_metadata(keys: list[str], urls: list[str], captions: list[str], rng: np.random.Generator,
                   tars: list[str] | None = None) -> pa.Table:
    n = len(keys)
    columns = {"URL": urls, "caption": captions, "key": keys, "shard": [k[:5] for k in keys],
               "WIDTH": rng.integers(64, 1024, n), "HEIGHT": rng.integers(64, 1024, n),
               "similarity": rng.uniform(0.28, 0.4, n), "punsafe": rng.uniform(0, 1, n),
               "pwatermark": rng.uniform(0, 1, n), "LANGUAGE": rng.choice(["en", "de", "fr"], n)}
    if tars is not None:
        columns["tar"] = tars
    return pa.table(columns)


def mixture_crawl(store: Storage, crawl: str, rows_per_bucket: int = 600, dim: int = 32, seed: int = 0
                  ) -> tuple[list[EmbeddingKeys], pa.Table, np.ndarray]:
    """A crawl's embeddings (float16, normalized, Gaussian mixture; text = image + noise) in every bucket, the
    row-aligned index metadata, and the image vectors (float32) for checking."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    buckets, tables, vectors = [], [], []
    for b in LAYOUT.bucket_keys():
        n = rows_per_bucket
        img = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, dim))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + 0.2 * rng.normal(size=(n, dim))
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        keys = [f"{crawl[-2:]}{b}{i:06d}" for i in range(n)]
        urls = [f"http://example.com/{k}.jpg" for k in keys]
        emb_meta = pa.table({"key": keys, "url": urls, "caption": keys, "language": ["en"] * n})
        files = paths.bucket_embeddings(crawl, b, LAYOUT)
        write_embeddings(store, files, img.astype(np.float16), txt.astype(np.float16), emb_meta)
        buckets.append(files)
        tables.append(index_metadata(keys, urls, [f"caption of {k}" for k in keys], rng))
        vectors.append(img.astype(np.float16).astype(np.float32))
    return buckets, pa.concat_tables(tables), np.concatenate(vectors)


def clip_crawl(store: Storage, crawl: str, model: object, n: int = 90, seed: int = 0, layout: Layout = LAYOUT
               ) -> tuple[list[EmbeddingKeys], pa.Table, dict[str, bytes]]:
    """A crawl of rendered scenes in webdataset shards (one per bucket), embedded by the small CLIP (the service's
    query encoder), with index metadata naming each sample's shard. Every third sample is marked unsafe
    (punsafe 0.9). Returns the buckets, the metadata and {key: stored JPEG bytes}."""
    import io
    import random
    import tarfile

    import torch
    from PIL import Image

    from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    buckets, tables, images = [], [], {}
    per = n // layout.buckets
    for b in layout.bucket_keys():
        keys, captions, jpgs = [], [], []
        for i in range(per):
            scene = random_scene(rng)
            key = f"{crawl[-2:]}{b}{i:05d}"
            keys.append(key)
            captions.append(scene.caption("en"))
            jpgs.append(jpeg_bytes(render(scene, (128, 96), seed=seed * 1000 + int(b) * 100 + i)))
            images[key] = jpgs[-1]
        tar_key = f"{paths.image_shards(crawl, b, layout)}/00000.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key, caption, jpg in zip(keys, captions, jpgs, strict=True):
                for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        store.write_bytes(tar_key, buf.getvalue())
        pixels = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpgs]
        img = model.encode_pixels(torch.stack([model.preprocess(p) for p in pixels]))
        txt = model.encode_texts(captions)
        urls = [f"http://images.example/{k}.jpg" for k in keys]
        files = paths.bucket_embeddings(crawl, b, layout)
        write_embeddings(store, files, img.astype(np.float16), txt.astype(np.float16),
                         pa.table({"key": keys, "url": urls, "caption": captions, "language": ["en"] * per}))
        buckets.append(files)
        table = index_metadata(keys, urls, captions, nrng, tars=[tar_key] * per)
        punsafe = np.where(np.arange(per) % 3 == 0, 0.9, 0.05)
        tables.append(table.set_column(table.schema.get_field_index("punsafe"), "punsafe", pa.array(punsafe)))
    return buckets, pa.concat_tables(tables), images
