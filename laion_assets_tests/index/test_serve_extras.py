"""clip-retrieval's aesthetic_score / aesthetic_weight and use_violence_detector on an index of the files' model
(ViT-L/14-sized embeddings with LAION's real rating embeddings and violence prompts), ignored and said so on an
index of another model, and min_aesthetic filtering results and exports."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import write_embeddings
from laion_assets.core.index.build import build_index
from laion_assets.core.settings import IndexSettings, ModelSettings, ServeSettings
from laion_assets.core.storage import Storage
from laion_assets.serve.app import make_app
from laion_assets.serve.encoder import QueryEncoder
from laion_assets.serve.extras import load_extras
from laion_assets_tests.index.service import running
from laion_assets_tests.index.worlds import index_metadata

SETTINGS = IndexSettings(index_key="Flat", eval_queries=0, build_memory="1G", query_memory="256M")


def crawl_index(store: Storage, crawl: str, vectors: np.ndarray, model: str, aesthetic: bool = True) -> pa.Table:
    n = len(vectors)
    keys = [f"{i:06d}" for i in range(n)]
    files = paths.embedding_files(f"crawls/{crawl}/emb", 0)
    write_embeddings(store, files, vectors.astype(np.float16), vectors.astype(np.float16),
                     pa.table({"key": keys, "url": keys, "caption": keys, "language": ["en"] * n,
                               "model": [model] * n}))
    table = index_metadata(keys, [f"http://x/{k}.jpg" for k in keys], keys, np.random.default_rng(0))
    if aesthetic:
        table = table.append_column("aesthetic", pa.array(np.linspace(1, 9, n)))
    build_index(store, [files], table, store.uri(paths.knn_index(crawl)), SETTINGS)
    return table


@pytest.fixture(scope="module")
def extras_world(tmp_path_factory, realmodels):
    root = tmp_path_factory.mktemp("extras") / "data"
    store = Storage(str(root))
    rng = np.random.default_rng(3)
    violence = np.load(realmodels / "nsfw/violence_detection_vit_l_14.npy")
    x = rng.normal(size=(300, 768)).astype(np.float32)
    x[:40] = violence[1] + 0.02 * rng.normal(size=(40, 768))  # rows the violence detector drops
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    crawl_index(store, "CC-MAIN-2099-10", x, "ViT-L-14/openai")
    small = rng.normal(size=(50, 64)).astype(np.float32)
    crawl_index(store, "CC-MAIN-2099-11", small / np.linalg.norm(small, axis=1, keepdims=True), "small-clip-multi",
                aesthetic=False)
    # The laion preset's embedding model, these two files given as settings (no fetch needed).
    settings = ModelSettings(preset="laion", models_dir=str(root / "none"),
                             rating_embeddings=str(realmodels / "aesthetic/v1/vit_l_14_embeddings"),
                             violence_prompts=str(realmodels / "nsfw/violence_detection_vit_l_14.npy"))
    extras = load_extras(settings)
    app = make_app(str(root), ServeSettings(), QueryEncoder(settings), extras=extras)
    with running(app) as base:
        yield base, x, violence, extras


def post(base: str, path: str, doc: dict) -> requests.Response:
    return requests.post(f"{base}{path}", data=json.dumps(doc), timeout=60)


def test_status_says_where_aesthetic_and_violence_apply(extras_world):
    base, *_ = extras_world
    status = requests.get(f"{base}/indices-status", timeout=10).json()
    big, small = status["CC-MAIN-2099-10"], status["CC-MAIN-2099-11"]
    assert big["model"] == "ViT-L-14/openai" and big["aesthetic_score"]["applied"]
    assert big["use_violence_detector"]["applied"] and big["aesthetic_scores"]
    assert not small["aesthetic_score"]["applied"] and "ignored" in small["aesthetic_score"]["reason"]
    assert "768-d" in small["use_violence_detector"]["reason"] and not small["aesthetic_scores"]


def test_aesthetic_score_moves_the_query_and_the_violence_detector_drops(extras_world):
    base, x, violence, extras = extras_world
    query = x[100]
    doc = {"indice_name": "CC-MAIN-2099-10", "embedding_input": query.tolist(), "num_images": 5}
    plain = post(base, "/knn-service", doc).json()
    assert plain[0]["id"] == 100
    moved = post(base, "/knn-service", {**doc, "aesthetic_score": 9, "aesthetic_weight": 0.5}).json()
    expected = query + 0.5 * extras.ratings[9]
    expected /= np.linalg.norm(expected)
    stored = x.astype(np.float16).astype(np.float32)
    best = np.argsort(-(stored @ expected))[:5]
    assert [r["id"] for r in moved] == best.tolist()
    assert abs(moved[0]["similarity"] - float(stored[best[0]] @ expected)) < 1e-3
    # Near the second violence prompt: dropped with the detector on, there without it.
    near = {**doc, "embedding_input": violence[1].tolist(), "num_images": 20, "num_result_ids": 100}
    assert all(r["id"] < 40 for r in post(base, "/knn-service", near).json())
    kept = post(base, "/knn-service", {**near, "use_violence_detector": True}).json()
    assert kept and all(r["id"] >= 40 for r in kept)


def test_clip_clients_defaults_still_work_where_they_do_not_apply(extras_world):
    from laion_assets_tests.index.test_serve import clip_client_module

    base, *_ = extras_world
    cc = clip_client_module()
    client = cc.ClipClient(url=f"{base}/knn-service", indice_name="CC-MAIN-2099-11", num_images=5)
    vector = np.random.default_rng(0).normal(size=64)
    results = client.query(embedding_input=(vector / np.linalg.norm(vector)).tolist())
    assert 0 < len(results) <= 5  # aesthetic_score=9 and use_violence_detector=True ignored on this index


def test_min_aesthetic_filters_results_and_exports(extras_world):
    base, x, *_ = extras_world
    doc = {"indice_name": "CC-MAIN-2099-10", "embedding_input": x[5].tolist(), "num_images": 50,
           "num_result_ids": 300, "min_aesthetic": 6}
    found = post(base, "/knn-service", doc).json()
    assert found and all(r["aesthetic"] >= 6 for r in found)
    export = post(base, "/export", {"indice_name": "CC-MAIN-2099-10", "filter": {"min_aesthetic": 8.5}})
    table = pq.read_table(io.BytesIO(export.content))
    assert table.num_rows and min(table["aesthetic"].to_pylist()) >= 8.5
    refused = post(base, "/knn-service", {**doc, "indice_name": "CC-MAIN-2099-11",
                                          "embedding_input": [0.1] * 64})
    assert refused.status_code == 400 and "no aesthetic scores" in refused.json()["error"]
    bad = post(base, "/knn-service", {**doc, "min_aesthetic": 11})
    assert bad.status_code == 400 and "min_aesthetic must be between 0 and 10" in bad.json()["error"]
