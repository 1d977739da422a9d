"""The stage as Dagster assets: in-process materialization on local storage and on a real S3 server."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from laion_assets.assets.crawl import build_crawl_assets
from laion_assets.core import paths
from laion_assets.core.download.report import STATUSES
from laion_assets.core.paths import Layout
from laion_assets.core.settings import SAMPLE_CRAWL
from laion_assets.core.storage import Storage
from laion_assets.definitions import build_assets, build_definitions
from laion_assets.demo import image_server
from laion_assets.resources import ImageFetchResource, resources_from_env

LAYOUT = Layout(chunks=2, buckets=2)


def materialize_stage(resources: dict, mirror: Path, crawl: str = SAMPLE_CRAWL, clip: bool = False
                      ) -> dict[str, list[dict]]:
    """sample_crawl, then every partition of every stage, with the sample images served on a free loopback
    port; returns each asset's materialization metadata."""
    instance = dg.DagsterInstance.ephemeral()
    assets = build_assets(LAYOUT)
    by = {a.key.to_user_string(): a for a in assets}
    meta: dict[str, list[dict]] = {}
    resources = {**resources, "image_fetch": ImageFetchResource(allow_networks=["127.0.0.1/32"], deadline_s=5.0)}

    def run(name: str, partition=None, config: dict | None = None) -> None:
        result = dg.materialize(assets, selection=[by[name]], partition_key=partition, instance=instance,
                                resources=resources, run_config={"ops": {name: {"config": config}}} if config else None)
        assert result.success
        for m in result.asset_materializations_for_node(name):
            meta.setdefault(name, []).append({k: v.value for k, v in m.metadata.items()})

    (mirror / "www").mkdir(parents=True, exist_ok=True)
    with image_server(str(mirror / "www"), port=0) as base:
        run("sample_crawl", config={"image_base_url": base})
        assert instance.get_dynamic_partitions("crawls") == [crawl]
        run("wat_manifest", crawl)
        for chunk in LAYOUT.chunk_keys():
            run("candidate_pairs", dg.MultiPartitionKey({"crawl": crawl, "chunk": chunk}))
        for bucket in LAYOUT.bucket_keys():
            run("unique_pairs", dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}))
        for bucket in LAYOUT.bucket_keys():
            run("image_shards", dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}),
                config={"samples_per_shard": 64})
    if clip:
        for bucket in LAYOUT.bucket_keys():
            for name in ("clip_scores", "image_embeddings", "safety_scores", "watermark_scores"):
                run(name, dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}))
        # A rerun with unchanged models only re-applies the thresholds to the stored similarities.
        run("clip_scores", dg.MultiPartitionKey({"crawl": crawl, "bucket": LAYOUT.bucket_keys()[0]}))
    return meta


def check_image_shards(meta: dict[str, list[dict]]) -> None:
    for unique, shards in zip(meta["unique_pairs"], meta["image_shards"], strict=True):
        assert shards["urls"] == unique["rows_out"] == sum(shards[s] for s in STATUSES)
        assert shards["shards"] == -(-unique["rows_out"] // 64) and shards["images_per_s"] > 0
    total = {s: sum(m[s] for m in meta["image_shards"]) for s in STATUSES}
    # The sample crawl serves most images and plants 404s, robots.txt refusals and truncated JPEGs.
    assert total["success"] > 0.8 * sum(total.values())
    assert total["failed_to_download"] and total["failed_to_resize"] and total["skipped_by_policy"]


def test_definitions_load_and_validate():
    defs = build_definitions(LAYOUT)
    dg.Definitions.validate_loadable(defs)
    from laion_assets.definitions import defs as module_defs

    dg.Definitions.validate_loadable(module_defs)
    keys = {k.to_user_string() for k in module_defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"sample_crawl", "wat_manifest", "candidate_pairs", "unique_pairs", "image_shards"} <= keys


def test_stage_on_local_storage(tmp_path):
    resources = resources_from_env({"LAION_ASSETS_STORAGE": str(tmp_path / "data"),
                                    "LAION_ASSETS_SOURCE": str(tmp_path / "mirror")})
    meta = materialize_stage(resources, tmp_path / "mirror", clip=True)
    assert meta["wat_manifest"][0]["wat_files"] == 4
    pairs = sum(m["pairs"] for m in meta["candidate_pairs"])
    assert pairs > 500
    for m in meta["candidate_pairs"]:
        assert m["records"] > 0 and m["seconds"] > 0 and "preview" in m
        assert m["dropped_no_alt"] > 0 and m["dropped_extension"] > 0
    rows_in = sum(m["rows_in"] for m in meta["unique_pairs"])
    rows_out = sum(m["rows_out"] for m in meta["unique_pairs"])
    assert rows_in == pairs and 0 < rows_out < rows_in
    files = [tmp_path / "data" / paths.unique_pairs(SAMPLE_CRAWL, b, LAYOUT) for b in LAYOUT.bucket_keys()]
    unique = pl.concat([pl.read_parquet(f) for f in files])
    assert unique.height == rows_out and unique["url"].is_unique().all()
    check_image_shards(meta)
    shard_dirs = [tmp_path / "data" / paths.image_shards(SAMPLE_CRAWL, b, LAYOUT) for b in LAYOUT.bucket_keys()]
    tars = [p for d in shard_dirs for p in d.glob("*.tar")]
    assert len(tars) == sum(m["shards"] for m in meta["image_shards"])
    check_clip_stage(meta, resources["storage"].get())


def check_clip_stage(meta: dict[str, list[dict]], store: Storage) -> None:
    import numpy as np

    from laion_assets.core.clip.embeddings import read_embeddings

    scores, embeddings = meta["clip_scores"], meta["image_embeddings"]
    for shards, score, emb, safety, mark in zip(meta["image_shards"], scores, embeddings, meta["safety_scores"],
                                                meta["watermark_scores"], strict=False):
        assert score["samples"] == shards["success"] and 0 < score["kept"] <= score["samples"]
        assert emb["dagster/row_count"] == score["kept"] == safety["samples"] == mark["samples"]
    assert scores[-1]["refiltered_only"] is True
    for bucket in LAYOUT.bucket_keys():
        img, txt, table = read_embeddings(store, paths.bucket_embeddings(SAMPLE_CRAWL, bucket, LAYOUT))
        rows = pl.from_arrow(table)
        assert img.shape == txt.shape and img.shape[0] == rows.height and img.dtype == np.float16
        assert rows["key"].is_sorted()


def test_unreadable_wat_fails_the_partition_but_keeps_the_rest(tmp_path):
    resources = resources_from_env({"LAION_ASSETS_STORAGE": str(tmp_path / "data"),
                                    "LAION_ASSETS_SOURCE": str(tmp_path / "mirror")})
    instance = dg.DagsterInstance.ephemeral()
    assets = build_crawl_assets(LAYOUT)
    by = {a.key.to_user_string(): a for a in assets}
    dg.materialize(assets, selection=[by["sample_crawl"]], instance=instance, resources=resources)
    listing = tmp_path / "mirror/crawl-data" / SAMPLE_CRAWL / "wat.paths.gz"
    wat_paths = gzip.decompress(listing.read_bytes()).decode().split()
    listing.write_bytes(gzip.compress("\n".join([wat_paths[0], "crawl-data/missing.warc.wat.gz", *wat_paths[1:]])
                                      .encode()))
    dg.materialize(assets, selection=[by["wat_manifest"]], partition_key=SAMPLE_CRAWL, instance=instance,
                   resources=resources)
    result = dg.materialize(assets, selection=[by["candidate_pairs"]], instance=instance, resources=resources,
                            partition_key=dg.MultiPartitionKey({"crawl": SAMPLE_CRAWL, "chunk": "0000"}),
                            raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "missing.warc.wat.gz" in str(failure.event_specific_data.error)
    import json

    marker = tmp_path / "data" / paths.candidates_marker(SAMPLE_CRAWL, "0000", LAYOUT)
    report = json.loads(marker.read_text())
    assert report["files_failed"] == 1 and report["files"] == 1 and report["pairs"] > 0


def test_stage_on_s3(s3_server, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="laion-test")
    resources = resources_from_env({"LAION_ASSETS_STORAGE": "s3://laion-test/run1",
                                    "LAION_ASSETS_SOURCE": str(tmp_path / "mirror"),
                                    "AWS_ENDPOINT_URL": s3_server})
    meta = materialize_stage(resources, tmp_path / "mirror", clip=True)
    rows_out = sum(m["rows_out"] for m in meta["unique_pairs"])
    assert meta["unique_pairs"][0]["dagster/uri"].startswith("s3://laion-test/run1/crawls/")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="laion-test", Prefix="run1/")["Contents"]]
    assert f"run1/crawls/{SAMPLE_CRAWL}/wat_manifest.parquet" in keys
    assert sum(k.endswith("/_report.json") for k in keys) == 2
    unique_keys = [k for k in keys if "/unique_pairs/" in k]
    assert len(unique_keys) == 2
    frames = [pl.read_parquet(io.BytesIO(client.get_object(Bucket="laion-test", Key=k)["Body"].read()))
              for k in unique_keys]
    unique = pl.concat(frames)
    assert unique.height == rows_out > 0 and unique["url"].is_unique().all()
    check_image_shards(meta)
    stats = [k for k in keys if "/images/" in k and k.endswith("_stats.json")]
    assert len(stats) == sum(m["shards"] for m in meta["image_shards"])
    store = resources["storage"].get()
    assert store.uri(paths.clip_scores(SAMPLE_CRAWL, "0000", LAYOUT)).startswith("s3://laion-test/run1/")
    check_clip_stage(meta, store)


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
