"""The search service: clip-retrieval's real ClipClient against it, every query kind, the filters, our image route,
and a clear 4xx for each kind of bad input while the service keeps serving."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from laion_assets.core import paths
from laion_assets.core.index.search import write_removed
from laion_assets.core.settings import ServeSettings
from laion_assets.serve.app import make_app
from laion_assets_tests.index.conftest import CRAWLS
from laion_assets_tests.index.service import running


def clip_client_module():
    """clip-retrieval's own clip_client.py, loaded alone (the package's __init__ imports its flask back end)."""
    spec = importlib.util.find_spec("clip_retrieval")
    assert spec and spec.submodule_search_locations, "clip-retrieval is not installed (make installs it --no-deps)"
    path = os.path.join(list(spec.submodule_search_locations)[0], "clip_client.py")
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def post(base: str, path: str, doc: object) -> requests.Response:
    return requests.post(f"{base}{path}", data=json.dumps(doc), timeout=60)  # no content type, as ClipClient


def test_indices_are_listed_and_a_corrupt_one_is_unavailable_with_the_reason(service):
    assert requests.get(f"{service}/indices-list", timeout=10).json() == ["CC-MAIN-2099-01", "CC-MAIN-2099-02", "all"]
    status = requests.get(f"{service}/indices-status", timeout=10).json()
    assert status["CC-MAIN-2099-03"]["available"] is False and "cannot read the index" in status[
        "CC-MAIN-2099-03"]["reason"]
    assert status["all"]["rows"] == status["CC-MAIN-2099-01"]["rows"] + status["CC-MAIN-2099-02"]["rows"] == 180
    r = post(service, "/knn-service", {"indice_name": "CC-MAIN-2099-03", "text": "a red circle", "num_images": 3})
    assert r.status_code == 503 and "unavailable" in r.json()["error"]


def test_clip_client_queries_by_text_image_path_and_embedding(service, world, tmp_path):
    _, encoder, images, tables = world
    cc = clip_client_module()
    crawl = CRAWLS[0]
    client = cc.ClipClient(url=f"{service}/knn-service", indice_name=crawl, num_images=10, deduplicate=False,
                           use_safety_model=False, use_violence_detector=False, aesthetic_weight=0.0)
    # Text: the caption of an indexed image finds images of that scene (the small CLIP knows shapes and colours).
    table = tables[crawl]
    caption = table["caption"][4].as_py()
    results = client.query(text=caption)
    assert len(results) == 10 and {"id", "similarity", "url", "caption", "key", "punsafe", "WIDTH"} <= set(results[0])
    assert results[0]["similarity"] >= results[-1]["similarity"]
    colour = caption.split()[1]  # "a red circle ...": 8 colours, so chance would match 1 in 8
    assert sum(f"a {colour} " in r["caption"] for r in results[:5]) >= 4, [r["caption"] for r in results]
    # An image file: the stored image itself comes first.
    key = table["key"][7].as_py()
    path = tmp_path / "query.jpg"
    path.write_bytes(images[key])
    top = client.query(image=str(path))[0]
    assert top["key"] == key and top["similarity"] > 0.99 and top["url"] == f"http://images.example/{key}.jpg"
    # An embedding, and the text modality (searching captions).
    vector = encoder.text(caption).tolist()
    assert client.query(embedding_input=vector)[0]["similarity"] > 0.1
    text_client = cc.ClipClient(url=f"{service}/knn-service", indice_name=crawl, modality=cc.Modality.TEXT,
                                num_images=3, deduplicate=False, use_safety_model=False)
    assert text_client.query(embedding_input=vector)[0]["caption"] == caption
    # ClipClient's defaults (safety on, dedup on, mclip, aesthetic, violence) are accepted; unsafe rows never come.
    default = cc.ClipClient(url=f"{service}/knn-service", indice_name="all", num_images=20)
    found = default.query(text=caption)
    assert found and all(r["punsafe"] <= 0.5 for r in found) and {r["indice"] for r in found} <= set(CRAWLS)


def test_safety_removals_and_metadata(service, world):
    root, _, _, tables = world
    crawl = CRAWLS[1]
    caption = tables[crawl]["caption"][0].as_py()
    base = {"indice_name": crawl, "text": caption, "modality": "image", "num_images": 40}
    everything = post(service, "/knn-service", {**base, "use_safety_model": False}).json()
    safe = post(service, "/knn-service", {**base, "use_safety_model": True}).json()
    assert any(r["punsafe"] > 0.5 for r in everything) and all(r["punsafe"] <= 0.5 for r in safe)
    assert [r["id"] for r in safe] == [r["id"] for r in everything if r["punsafe"] <= 0.5]
    ids = [r["id"] for r in everything[:3]]
    meta = post(service, "/metadata", {"indice_name": crawl, "ids": ids}).json()
    assert [m["id"] for m in meta] == ids and meta[0]["metadata"]["key"] == everything[0]["key"]
    assert meta[0]["metadata"]["url"] == everything[0]["url"]


def test_removals_after_the_build_are_filtered_at_query_time(world, tmp_path):
    root, encoder, _, tables = world
    crawl = CRAWLS[0]
    copy = tmp_path / "data"
    shutil.copytree(root / paths.knn_index(crawl), copy / paths.knn_index(crawl))
    caption = tables[crawl]["caption"][10].as_py()
    with running(make_app(str(copy), ServeSettings(), encoder)) as base:
        before = post(base, "/knn-service", {"indice_name": crawl, "text": caption, "num_images": 10}).json()
    gone = {before[0]["id"], before[1]["id"]}
    write_removed(str(copy / paths.knn_index(crawl)), gone)
    with running(make_app(str(copy), ServeSettings(), encoder)) as base:
        after = post(base, "/knn-service", {"indice_name": crawl, "text": caption, "num_images": 10}).json()
        assert len(after) == 10 and not {r["id"] for r in after} & gone
        meta = post(base, "/metadata", {"indice_name": crawl, "ids": [before[0]["id"]]}).json()
        assert meta == []
        assert requests.get(f"{base}/image/{crawl}/{before[0]['id']}", timeout=10).status_code == 404


def test_searches_on_the_event_loop_and_in_worker_threads_agree(world):
    """A cheap search runs on the event loop (ServeSettings.inline_search_ms), others in threads: same results."""
    from laion_assets.serve.app import INDICES, SEARCH_MS

    root, encoder, _, tables = world
    crawl = CRAWLS[0]
    queries = [{"indice_name": crawl, "text": tables[crawl]["caption"][i].as_py(), "num_images": 10}
               for i in (3, 30)] + [{"indice_name": crawl, "text": "a red circle", "num_images": 5,
                                     "deduplicate": True, "modality": "text"}]
    answers = []
    for limit in (0.0, 1e9):  # always threads; always the event loop (dedup still goes to a thread)
        app = make_app(str(root), ServeSettings(inline_search_ms=limit), encoder)
        with running(app) as base:
            answers.append([post(base, "/knn-service", q).json() for q in queries])
        assert set(app[SEARCH_MS]) == {(crawl, "image")} and app[SEARCH_MS][(crawl, "image")] > 0
    assert answers[0] == answers[1] and all(len(a) for a in answers[0])
    # The merged index reads its lists from disk: its searches always go to a thread (I/O waits are not CPU time).
    indices = app[INDICES].available
    assert indices["all"].on_disk and not indices[crawl].on_disk


def test_images_come_from_our_shards(service, world):
    """By result id (the index row), in a crawl's index and in the merged one."""
    _, _, images, tables = world
    key = tables[CRAWLS[1]]["key"][5].as_py()
    for indice in (CRAWLS[1], "all"):
        hits = post(service, "/knn-service", {"indice_name": indice, "text": tables[CRAWLS[1]]["caption"][5].as_py(),
                                              "num_images": 50, "use_safety_model": False}).json()
        hit = next(h for h in hits if h["key"] == key)
        r = requests.get(f"{service}/image/{indice}/{hit['id']}", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg" and r.content == images[key]
    assert requests.get(f"{service}/image/{CRAWLS[1]}/{key}x", timeout=10).status_code == 404
    assert requests.get(f"{service}/image/{CRAWLS[1]}/99999999", timeout=10).status_code == 404


def test_image_url_goes_through_the_guard(world, loopback):
    root, encoder, images, tables = world
    key = tables[CRAWLS[0]]["key"][4].as_py()  # a safe one: ClipClient asks for the safety filter by default
    loopback.static("/q.jpg", images[key], "image/jpeg")
    doc = {"indice_name": CRAWLS[0], "image_url": f"{loopback.base}/q.jpg", "num_images": 3}
    with running(make_app(str(root), ServeSettings(), encoder)) as base:
        refused = post(base, "/knn-service", doc)
        assert refused.status_code == 400 and "forbidden (loopback)" in refused.json()["error"]
    assert loopback.hits.get("/q.jpg", 0) == 0
    with running(make_app(str(root), ServeSettings(allow_networks=("127.0.0.1/32",)), encoder)) as base:
        client = clip_client_module().ClipClient(url=f"{base}/knn-service", indice_name=CRAWLS[0], num_images=3)
        assert client.query(image=f"{loopback.base}/q.jpg")[0]["key"] == key  # ClipClient sends it as image_url


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"indice_name": "CC-MAIN-1999-99", "text": "x"}, 404, "unknown indice"),
    ({"indice_name": 7, "text": "x"}, 400, "indice_name"),
    ({"text": "x", "num_images": "10"}, 400, "num_images must be an integer"),
    ({"text": "x", "num_images": 0}, 400, "num_images must be between 1"),
    ({"text": "x", "num_images": 10**9}, 400, "num_images must be between 1"),
    ({"text": "x", "num_result_ids": -1}, 400, "num_result_ids"),
    ({"text": "x", "modality": "audio"}, 400, "modality"),
    ({"text": "x", "deduplicate": "yes"}, 400, "deduplicate must be true or false"),
    ({"text": "x", "aesthetic_weight": 3}, 400, "aesthetic_weight"),
    ({"text": ""}, 400, "empty query"),
    ({"text": "   "}, 400, "empty query"),
    ({}, 400, "empty query"),
    ({"text": "x", "embedding_input": [0.1]}, 400, "give one query"),
    ({"image": base64.b64encode(b"this is not an image").decode()}, 400, "not a readable image"),
    ({"image": "%%%"}, 400, "base64"),
    ({"image_url": "http://127.0.0.2/a.jpg"}, 400, "forbidden (loopback)"),
    ({"image_url": "file:///etc/passwd"}, 400, "scheme 'file' is not http(s)"),
    ({"image_url": "http://10.1.2.3/a.jpg"}, 400, "forbidden (private)"),
    ({"embedding_input": [0.1] * 7}, 400, "7 dimensions"),
    ({"embedding_input": ["a"] * 7}, 400, "list of numbers"),
    ({"embedding_input": "0.1,0.2"}, 400, "list of numbers"),
    ({"embedding_input": [True] * 7}, 400, "list of numbers"),
    ({"embedding_input": [0.1] * 6 + [None]}, 400, "list of numbers"),
])
def test_bad_input_gets_a_clear_4xx(service, body, status, message):
    if isinstance(body, dict):
        body = json.dumps({"indice_name": CRAWLS[0], **body} if "indice_name" not in body else body).encode()
    r = requests.post(f"{service}/knn-service", data=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "Traceback" not in r.text


def test_oversized_upload_and_bad_metadata_requests_then_the_service_still_serves(service, world):
    _, _, _, tables = world
    huge = json.dumps({"indice_name": CRAWLS[0], "image": "A" * (100 * 1024 * 1024)}).encode()
    try:
        r = requests.post(f"{service}/knn-service", data=huge, timeout=60)
        assert r.status_code == 413 and "over the limit" in r.json()["error"]
    except requests.ConnectionError:
        pass  # the service may close the connection before the client finished sending 100 MB: also a refusal
    for doc, message in (({"indice_name": CRAWLS[0], "ids": [10**9]}, "out of range"),
                         ({"indice_name": CRAWLS[0], "ids": "1,2"}, "list of integers")):
        r = post(service, "/metadata", doc)
        assert r.status_code == 400 and message in r.json()["error"]
    ok = post(service, "/knn-service", {"indice_name": CRAWLS[0], "text": tables[CRAWLS[0]]["caption"][0].as_py(),
                                        "num_images": 5})
    assert ok.status_code == 200 and len(ok.json()) == 5


def test_export_current_results_and_a_whole_crawl_filter(service):
    ids = [0, 5, 9]
    r = post(service, "/export", {"indice_name": CRAWLS[0], "ids": ids})
    assert r.status_code == 200 and "attachment" in r.headers["Content-Disposition"]
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == 3 and table.column_names[:2] == ["URL", "TEXT"]
    assert {"WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "LANGUAGE"} <= set(table.column_names)
    r = post(service, "/export", {"indice_name": CRAWLS[0], "filter": {"max_punsafe": 0.5, "min_width": 300,
                                                                       "language": "en"}})
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows > 0 and min(table["WIDTH"].to_pylist()) >= 300
    assert max(table["punsafe"].to_pylist()) <= 0.5 and set(table["LANGUAGE"].to_pylist()) == {"en"}
    assert np.all(np.asarray(table["URL"].to_pylist()) != None)  # noqa: E711 - img2dataset needs every URL
    bad = post(service, "/export", {"indice_name": CRAWLS[0], "filter": {"min_width": -1}})
    assert bad.status_code == 400
