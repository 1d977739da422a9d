"""The kNN index assets on a small released crawl: knn_index and knn_index_all materialized through the IO manager,
queried through the service's search code; a removal filtered out at query time before the rebuild and left out
by the rebuild that the automation requests; the recall check."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.clip import scores
from laion_assets.core.clip.embeddings import EMBED_META_SCHEMA, write_embeddings
from laion_assets.core.index import metadata as meta
from laion_assets.core.index.search import search
from laion_assets.core.release import removals as rl
from laion_assets.core.storage import Storage
from laion_assets.serve.indices import load_indices
from laion_assets_tests.graph import LAYOUT, OPS, graph_resources, output
from laion_assets_tests.release.upstream import ReleaseGraph, report_made, write_crawl

CRAWL = "CC-MAIN-2099-01"
DIM = 32
BUILD = {"index_key": "Flat", "eval_queries": 20, "build_memory": "1G", "query_memory": "256M"}


def write_embeddings_of(store: Storage, made: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random unit image embeddings (text: the image's plus noise) of every kept sample, as image_embeddings
    writes them with its record; returns {url: image embedding}."""
    rng = np.random.default_rng(seed)
    vectors = {}
    for bucket, inputs in made.items():
        kept = scores.kept_keys(inputs.scores)
        rows = pl.from_arrow(inputs.rows).filter(pl.col("key").is_in(list(kept))).sort("key")
        img = rng.normal(size=(rows.height, DIM)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + 0.3 * rng.normal(size=img.shape).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        table = pa.table({"key": rows["key"].to_list(), "url": rows["url"].to_list(),
                          "caption": rows["caption"].to_list(), "language": [None] * rows.height},
                         schema=EMBED_META_SCHEMA)
        manifest = write_embeddings(store, paths.bucket_embeddings(CRAWL, bucket, LAYOUT), img.astype(np.float16),
                                    txt.astype(np.float16), table)
        store.write_bytes(output("image_embeddings", CRAWL, bucket, ".json"), manifest.to_json())
        vectors.update(zip(rows["url"].to_list(), img, strict=True))
    return vectors


def report_embeddings(graph: ReleaseGraph) -> None:
    """The instance learns that image_embeddings (and the CLIP stage before it) were made and passed their checks."""
    report_made(graph, CRAWL, ("unique_pairs", "image_shards", "clip_scores", "safety_scores", "watermark_scores",
                           "aesthetic_scores",
                               "image_embeddings"))


def released(store: Storage) -> pl.DataFrame:
    manifest = json.loads(store.read_bytes(paths.release_manifest(CRAWL)))
    return pl.read_parquet([store.uri(paths.join(paths.release(CRAWL), p["file"])) for p in manifest["parts"]])


def urls_found(root: str, indice: str, vector: np.ndarray) -> list[str]:
    index = load_indices(root).available[indice]
    return [h.row["URL"] for h in search(index, vector, "image", num_result_ids=10, removed=index.removed)]


def test_knn_index_assets_removals_and_automation(tmp_path):
    from laion_assets.definitions import build_definitions

    root = str(tmp_path / "data")
    graph = ReleaseGraph(graph_resources(root, tmp_path / "mirror"))
    store = graph.resources["storage"].get()
    made = write_crawl(store, CRAWL, n=150)
    vectors = write_embeddings_of(store, made)
    graph.release(CRAWL)
    report_embeddings(graph)
    graph.run("knn_index", CRAWL, BUILD)
    graph.run("knn_index_all", None, {"eval_queries": 10})

    # What is indexed is exactly what is released: removed samples and dropped duplicates are not.
    release = released(store)
    table = meta.open_arrow(paths.index_files(store.uri(paths.knn_index(CRAWL))).metadata)
    assert sorted(zip(table["tar"].to_pylist(), table["key"].to_pylist(), strict=True)) == sorted(
        zip(release["shard"].to_list(), release["key"].to_list(), strict=True))
    assert table["caption"].to_pylist()[0] and set(table.column_names) >= set(meta.COLUMNS)
    index_meta, all_meta = graph.meta["knn_index"][-1], graph.meta["knn_index_all"][-1]
    assert index_meta["rows"] == index_meta["image_vectors"] == release.height
    assert index_meta["excluded"] == sum(len(scores.kept_keys(m.scores)) for m in made.values()) - release.height
    assert index_meta["image_index_key"] == "Flat" and index_meta["recall_at_10"] == 1.0
    assert index_meta["bytes"] > 0 and index_meta["image_p99_ms"] >= index_meta["image_p50_ms"] > 0
    assert all_meta["rows"] == release.height and all_meta["image_recall_at_10"] >= 0.9
    record = json.loads(store.read_bytes(output("knn_index", CRAWL, suffix=".json")))
    assert {f["name"] for f in record["files"]} >= {"image.index", "text.index", "metadata.arrow", "_report.json"}
    assert all(len(f["sha256"]) == 64 for f in record["files"])
    passed = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in graph.checks}
    assert passed[("knn_index", "recall")] and passed[("knn_index_all", "recall")]
    assert passed[("release", "rows_match_filtered")]

    # The service's search finds a sample from its own image embedding.
    target = release.row(0, named=True)
    for indice in (CRAWL, "all"):
        assert urls_found(root, indice, vectors[target["URL"]])[0] == target["URL"]

    # A removal: the service filters the sample out before the rebuild...
    defs = build_definitions(LAYOUT, graph.resources, OPS)
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance)
    rl.add(store, [rl.make_entry("url", target["URL"], "url request")])
    for indice in (CRAWL, "all"):
        assert target["URL"] not in urls_found(root, indice, vectors[target["URL"]])
    index = load_indices(root).available[CRAWL]
    assert [index.metadata["URL"][i].as_py() for i in index.removed] == [target["URL"]]
    # ... the filtered metadata re-runs (the removal sensor and REPROCESS launch it), and the automation asks for
    # the crawl's index again,
    calm = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance, cursor=quiet.cursor)
    assert not calm.get_requested_partitions(dg.AssetKey("knn_index"))
    for bucket in LAYOUT.bucket_keys():
        graph.run("filtered_metadata", dg.MultiPartitionKey({"crawl": CRAWL, "bucket": bucket}))
    after = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance, cursor=calm.cursor)
    assert after.get_requested_partitions(dg.AssetKey("knn_index")) == {CRAWL}
    # ... whose rebuild leaves the sample out, then `all`'s.
    graph.run("knn_index", CRAWL, BUILD)
    merged = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance, cursor=after.cursor)
    assert merged.total_requested == 1 and merged.get_requested_partitions(dg.AssetKey("knn_index_all")) == {None}
    graph.run("knn_index_all", None, {"eval_queries": 10})
    rebuilt = meta.open_arrow(paths.index_files(store.uri(paths.knn_index(CRAWL))).metadata)
    assert target["URL"] not in rebuilt["URL"].to_pylist() and rebuilt.num_rows == release.height - 1
    assert graph.meta["knn_index"][-1]["removal_version"] == "v000001"
    assert not load_indices(root).available[CRAWL].removed  # nothing left to filter at query time
    for indice in (CRAWL, "all"):
        assert target["URL"] not in urls_found(root, indice, vectors[target["URL"]])

    # The recall check holds the index to the floor: blocking, it fails the run (and blocks what is downstream).
    result = graph.run("knn_index", CRAWL, {**BUILD, "min_recall": 1.01}, raise_on_error=False)
    assert not result.success
    failed = [c for c in graph.checks if c.check_name == "recall" and not c.passed]
    assert len(failed) == 1 and failed[0].asset_key == dg.AssetKey("knn_index")


def test_knn_index_assets_on_s3_upload_the_folders_and_serve_refuses_s3(s3_server, tmp_path, monkeypatch):
    import boto3
    from click.testing import CliRunner

    from laion_assets.cli import main

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="laion-index")
    graph = ReleaseGraph(graph_resources("s3://laion-index/run", tmp_path / "mirror",
                                         {"AWS_ENDPOINT_URL": s3_server}))
    store = graph.resources["storage"].get()
    made = write_crawl(store, CRAWL, n=80)
    vectors = write_embeddings_of(store, made)
    graph.release(CRAWL)
    graph.run("knn_index", CRAWL, BUILD)
    graph.run("knn_index_all", None, {"eval_queries": 10})
    assert graph.meta["knn_index"][-1]["folder"] == "s3://laion-index/run/" + paths.knn_index(CRAWL)
    # Every file of the record is in the bucket with its size; a local copy of the folders serves.
    local = tmp_path / "copy"
    for key, name in ((paths.knn_index(CRAWL), "knn_index"), (paths.knn_index_all(), "knn_index_all")):
        record = json.loads(store.read_bytes(output(name, CRAWL if name == "knn_index" else None, suffix=".json")))
        assert {f["name"] for f in record["files"]} == {k.rsplit("/", 1)[1] for k in store.list(key)}
        for f in record["files"]:
            assert store.size(paths.join(key, f["name"])) == f["bytes"]
            (local / key).mkdir(parents=True, exist_ok=True)
            store.download(paths.join(key, f["name"]), str(local / key / f["name"]))
    released_urls = set(meta.open_arrow(str(local / paths.knn_index(CRAWL) / "metadata.arrow"))["URL"].to_pylist())
    url = sorted(released_urls)[0]
    for indice in (CRAWL, "all"):
        assert urls_found(str(local), indice, vectors[url])[0] == url
    result = CliRunner().invoke(main, ["serve", "--storage", "s3://laion-index/run"])
    assert result.exit_code != 0 and "local storage root" in result.output
