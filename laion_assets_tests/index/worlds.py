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
