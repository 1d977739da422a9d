"""Fixtures of the index and service tests: two crawls of rendered scenes embedded by the small CLIP, their
indices (Flat per crawl, merged on disk as `all`), a corrupt third one, and the service over them."""

from __future__ import annotations

import os
import shutil

import pytest

from laion_assets.core import paths
from laion_assets.core.index.build import build_index
from laion_assets.core.index.merge import merge_indices
from laion_assets.core.settings import IndexSettings, ModelSettings, ServeSettings
from laion_assets.core.storage import Storage
from laion_assets.serve.app import make_app
from laion_assets.serve.encoder import QueryEncoder
from laion_assets_tests.conftest import MODELS_DIR
from laion_assets_tests.index.service import running
from laion_assets_tests.index.worlds import clip_crawl

CRAWLS = ("CC-MAIN-2099-01", "CC-MAIN-2099-02")
SETTINGS = IndexSettings(index_key="Flat", eval_queries=20, build_memory="1G", query_memory="256M")


@pytest.fixture(scope="session")
def world(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("serve") / "data"
    store = Storage(str(root))
    encoder = QueryEncoder(ModelSettings(models_dir=str(MODELS_DIR)))
    images, tables = {}, {}
    for seed, crawl in enumerate(CRAWLS):
        buckets, table, imgs = clip_crawl(store, crawl, encoder.model(), seed=seed)
        build_index(store, buckets, table, store.uri(paths.knn_index(crawl)), SETTINGS)
        images.update(imgs)
        tables[crawl] = table
    merge_indices({c: store.uri(paths.knn_index(c)) for c in CRAWLS}, store.uri(paths.knn_index_all()),
                  IndexSettings(eval_queries=10, merged_nprobe=64))
    # A third crawl whose index file is corrupt: listed as unavailable, the others unaffected.
    broken = store.uri(paths.knn_index("CC-MAIN-2099-03"))
    shutil.copytree(store.uri(paths.knn_index(CRAWLS[1])), broken)
    with open(os.path.join(broken, "image.index"), "wb") as f:
        f.write(b"\0" * 100)
    return root, encoder, images, tables


@pytest.fixture(scope="session")
def service(world):
    root, encoder, _, _ = world
    settings = ServeSettings(max_body_bytes=2 * 1024 * 1024, allow_networks=())
    with running(make_app(str(root), settings, encoder)) as base:
        yield base


