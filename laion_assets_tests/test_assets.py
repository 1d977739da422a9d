"""The graph as Dagster assets: in-process materialization through the IO manager, on local storage and on a real
S3 server from a clean bucket."""

from __future__ import annotations

import gzip
import json

import boto3
import dagster as dg
import polars as pl
import pytest

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import read_embeddings
from laion_assets.core.download.report import STATUSES
from laion_assets.core.settings import SAMPLE_CRAWL
from laion_assets.core.storage import Storage
from laion_assets.definitions import build_definitions
from laion_assets_tests.graph import CLIP_STAGE, LAYOUT, Graph, graph_resources, output

ALL_ASSETS = {"sample_crawl", "wat_manifest", "candidate_pairs", "unique_pairs", "image_shards", *CLIP_STAGE,
              "clip_filter_models", "embedding_model", "safety_model", "watermark_model", "aesthetic_model"}
RELEASE_STAGE = {"removal_list", "image_dedup", "semantic_dedup", "filtered_metadata", "release",
                 "dataset_statistics"}
INDEX_STAGE = {"knn_index", "knn_index_all"}
DECONTAMINATION = {"decontamination"}


def test_definitions_load_and_validate():
    defs = build_definitions(LAYOUT)
    dg.Definitions.validate_loadable(defs)
    from laion_assets.definitions import defs as module_defs

    dg.Definitions.validate_loadable(module_defs)
    graph = module_defs.resolve_asset_graph()
    assert ({k.to_user_string() for k in graph.get_all_asset_keys()}
            == ALL_ASSETS | RELEASE_STAGE | INDEX_STAGE | DECONTAMINATION)
    for key in graph.materializable_asset_keys:
        assert graph.get(key).code_version, f"{key} has no code_version"
    names = {s.name for s in module_defs.sensors}
    assert names == {"new_crawls", "observe_models", "reprocess_on_change", "crawl_backfill", "observe_removals",
                     "retry_downloads"}


def check_graph(graph: Graph, store: Storage) -> None:
    """What every run of the whole graph on the sample crawl must show, wherever it is stored."""
    meta = graph.meta
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks if not c.passed]
    assert not failed, failed
    checked = {(c.asset_key.to_user_string(), c.check_name) for c in graph.checks}
    assert ("image_shards", "one_row_per_url") in checked and ("image_embeddings", "row_aligned") in checked
    pairs = sum(m["pairs"] for m in meta["candidate_pairs"])
    rows_in = sum(m["rows_in"] for m in meta["unique_pairs"])
    rows_out = sum(m["dagster/row_count"] for m in meta["unique_pairs"])
    assert pairs == rows_in > rows_out > 0
    assert rows_out == sum(m["rows_out"] for m in meta["unique_pairs"])
    unique = pl.concat([pl.from_arrow(store.read_parquet(output("unique_pairs", SAMPLE_CRAWL, b)))
                        for b in LAYOUT.bucket_keys()])
    assert unique.height == rows_out and unique["url"].is_unique().all()
    for up, shards in zip(meta["unique_pairs"], meta["image_shards"], strict=True):
        assert shards["urls"] == up["dagster/row_count"] == sum(shards[s] for s in STATUSES)
        assert shards["shards"] == -(-up["dagster/row_count"] // 64)
    total = {s: sum(m[s] for m in meta["image_shards"]) for s in STATUSES}
    # The sample crawl serves most images and plants 404s, robots.txt refusals, truncated JPEGs and pages that opt
    # out of AI use (a fifth of them: their images are skipped without a request).
    opted_out = sum(m["skipped_page_opt_out"] for m in meta["image_shards"])
    assert opted_out and total["success"] + opted_out > 0.8 * sum(total.values())
    assert total["failed_to_download"] and total["failed_to_resize"] and total["skipped_by_policy"]
    for shards, score, emb, safety, mark, aesthetic in zip(meta["image_shards"], meta["clip_scores"],
                                                           meta["image_embeddings"], meta["safety_scores"],
                                                           meta["watermark_scores"], meta["aesthetic_scores"],
                                                           strict=False):
        assert score["samples"] == shards["success"] and 0 < score["kept"] <= score["samples"]
        assert emb["dagster/row_count"] == score["kept"] == safety["samples"] == mark["samples"] == aesthetic["samples"]
    for bucket in LAYOUT.bucket_keys():
        img, txt, rows = read_embeddings(store, paths.bucket_embeddings(SAMPLE_CRAWL, bucket, LAYOUT))
        assert img.shape == txt.shape and img.shape[0] == rows.num_rows and rows["key"].to_pylist() == sorted(
            rows["key"].to_pylist())


def test_whole_graph_on_local_storage(tmp_path):
    graph = Graph(graph_resources(str(tmp_path / "data"), tmp_path / "mirror"))
    graph.whole_crawl(tmp_path / "mirror")
    store = graph.resources["storage"].get()
    check_graph(graph, store)
    # Every output went through the IO manager to the key paths.py gives it.
    assert graph.meta["wat_manifest"][0]["dagster/uri"] == store.uri(output("wat_manifest", SAMPLE_CRAWL))
    assert graph.meta["clip_scores"][0]["dagster/uri"] == store.uri(output("clip_scores", SAMPLE_CRAWL, "0000"))
    marker = json.loads(store.read_bytes(paths.candidates_marker(SAMPLE_CRAWL, "0000", LAYOUT)))
    assert set(marker["files"]) == set(LAYOUT.bucket_keys()) and marker["wat_files"]
    # A rerun with unchanged models and images only re-applies the thresholds to the stored similarities.
    graph.run("clip_scores", dg.MultiPartitionKey({"crawl": SAMPLE_CRAWL, "bucket": "0000"}))
    assert graph.meta["clip_scores"][-1]["refiltered_only"] is True


def test_the_whole_graph_on_s3_from_a_clean_bucket(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="laion-graph")
    resources = graph_resources("s3://laion-graph/run1", tmp_path / "mirror", {"AWS_ENDPOINT_URL": s3_server})
    graph = Graph(resources)
    graph.whole_crawl(tmp_path / "mirror")
    store = resources["storage"].get()
    check_graph(graph, store)
    assert graph.meta["unique_pairs"][0]["dagster/uri"].startswith("s3://laion-graph/run1/crawls/")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="laion-graph")
            for o in page.get("Contents", [])]
    assert all(k.startswith("run1/") for k in keys)
    for name in ("wat_manifest", "unique_pairs", "image_shards", *CLIP_STAGE):
        for m in graph.meta[name][:1]:
            if "dagster/uri" in m:
                assert m["dagster/uri"].startswith("s3://laion-graph/run1/"), (name, m["dagster/uri"])
    stats = [k for k in keys if "/images/" in k and k.endswith("_stats.json")]
    assert len(stats) == sum(m["shards"] for m in graph.meta["image_shards"])
    manifests = [k for k in keys if "/images/" in k and k.endswith("/_manifest.json")]
    assert len(manifests) == LAYOUT.buckets


def test_unreadable_wat_fails_the_partition_but_keeps_the_rest(tmp_path):
    graph = Graph(graph_resources(str(tmp_path / "data"), tmp_path / "mirror"))
    graph.run("sample_crawl")
    from laion_assets.core.settings import OperationsSettings
    from laion_assets.operations import register_new_crawls

    register_new_crawls(graph.instance, graph.resources["crawl_source"], OperationsSettings().crawl_pattern)
    listing = tmp_path / "mirror" / paths.wat_listing(SAMPLE_CRAWL)
    wat_paths = gzip.decompress(listing.read_bytes()).decode().split()
    listing.write_bytes(gzip.compress("\n".join([wat_paths[0], "crawl-data/missing.warc.wat.gz", *wat_paths[1:]])
                                      .encode()))
    graph.run("wat_manifest", SAMPLE_CRAWL)
    result = dg.materialize(graph.assets, selection=[graph.by["candidate_pairs"]], instance=graph.instance,
                            resources=graph.resources, raise_on_error=False,
                            partition_key=dg.MultiPartitionKey({"crawl": SAMPLE_CRAWL, "chunk": "0000"}))
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(failures) == 1 and len(retries) == 1  # the network-bound step was retried once, then failed
    assert "missing.warc.wat.gz" in str(failures[0].event_specific_data.error)
    marker = tmp_path / "data" / paths.candidates_marker(SAMPLE_CRAWL, "0000", LAYOUT)
    report = json.loads(marker.read_text())["report"]
    assert report["files_failed"] == 1 and report["files"] == 1 and report["pairs"] > 0


def _core_modules() -> list[str]:
    import pkgutil

    import laion_assets.core as core

    return sorted(m.name for m in pkgutil.walk_packages(core.__path__, "laion_assets.core.") if not m.ispkg)


@pytest.mark.parametrize("module", _core_modules())
def test_every_stage_module_imports_without_dagster(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "assert 'dagster' not in sys.modules, 'the core must not import dagster'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loading_the_code_location_does_not_import_torch():
    """Every run and step process loads the code location: torch (seconds) is imported by CLIP steps only."""
    import subprocess
    import sys

    code = "import sys, laion_assets.definitions; assert 'torch' not in sys.modules, 'torch imported at load'"
    subprocess.run([sys.executable, "-c", code], check=True)

