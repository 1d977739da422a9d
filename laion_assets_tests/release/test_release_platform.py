"""Removals under the daemon, as the operations test runs the platform: the sample crawl is materialized and
released in-process into a Postgres instance; then only the daemon runs. A URL, a URL prefix, a sha256 and a pHash
are added to the removal list; the `observe_removals` sensor sees the new version and `reprocess_on_change`
re-materializes image_dedup, filtered_metadata, release and dataset_statistics. None of the removed samples is in any
release part, the statistics changed, the manifest names the version, and a purge leaves shards webdataset reads."""

from __future__ import annotations

import json
import time

import dagster as dg
import polars as pl
import pytest
import webdataset as wds
from click.testing import CliRunner

from laion_assets.cli import main as cli
from laion_assets.core import paths
from laion_assets.core.settings import SAMPLE_CRAWL
from laion_assets_tests.graph import LAYOUT, release_crawl
from laion_assets_tests.platform import crawled, running_platform, wait_for

SMALL = {"wat_files": 2, "pages_per_file": 10}
RELEASED = ("image_dedup", "filtered_metadata", "release", "dataset_statistics")


def _released(store) -> pl.DataFrame:
    manifest = json.loads(store.read_bytes(paths.release_manifest(SAMPLE_CRAWL)))
    return pl.read_parquet([store.uri(paths.join(paths.release(SAMPLE_CRAWL), p["file"])) for p in manifest["parts"]])


def _materialized_after(instance: dg.DagsterInstance, asset: str, after: float) -> set[str]:
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    return {str(r.partition_key) for r in records if r.timestamp > after}


@pytest.fixture
def platform(tmp_path, models):
    with running_platform(tmp_path) as running:
        yield running


@pytest.mark.timeout(900)  # a small crawl in-process (~2 min on 2 cores), the daemon's start and its five runs
def test_removals_reprocess_the_release_under_the_daemon(platform):
    _, env, dagster = platform
    instance, graph = crawled(dagster, env, SAMPLE_CRAWL, SMALL)
    release_crawl(graph)
    # The indices and the decontamination too: with every asset of the crawl materialized, new_crawls finds nothing
    # missing to backfill, and every run after the removal comes from the automation.
    graph.run("knn_index", SAMPLE_CRAWL, {"index_key": "Flat", "eval_queries": 20})
    graph.run("knn_index_all", None, {"eval_queries": 10})
    graph.run("decontamination", SAMPLE_CRAWL)  # no evaluation set registered: it checks nothing, and is done
    store = graph.resources["storage"].get()
    before = _released(store)
    stats_before = store.read_json(paths.statistics_json(SAMPLE_CRAWL))

    dagster.start(webserver=False)  # the daemon only
    time.sleep(15)  # its first sensor ticks see the list unchanged
    changed = time.time()
    folder, name = before.row(3, named=True)["URL"].rsplit("/", 1)
    prefix = f"{folder}/{name[:4]}"  # ten of the sample's hundred images
    url, sha, near = before.row(0, named=True), before.row(1, named=True), before.row(2, named=True)
    result = CliRunner().invoke(cli, ["removals", "add", "--storage", env["LAION_ASSETS_STORAGE"],
                                      "--url", url["URL"], "--domain", prefix, "--sha256", sha["sha256"],
                                      "--phash", near["phash"], "--radius", "2", "--reason", "partner request"])
    assert result.exit_code == 0, result.output

    def reprocessed() -> bool:
        crawl = {SAMPLE_CRAWL}
        buckets = {str(dg.MultiPartitionKey({"crawl": SAMPLE_CRAWL, "bucket": b})) for b in LAYOUT.bucket_keys()}
        return all(_materialized_after(instance, a, changed) >= (buckets if a == "filtered_metadata" else crawl)
                   for a in RELEASED) and (_materialized_after(instance, "dataset_statistics", changed) and
                                           store.read_json(paths.release_manifest(SAMPLE_CRAWL))["removal_version"]
                                           == "v000001")

    try:
        wait_for("the release re-materialized by the automation", reprocessed, 600, every=3)
    except TimeoutError:
        print(dagster.logs())
        raise
    # Nothing else launched runs: they came from the daemon's automation.
    from datetime import UTC, datetime

    runs = instance.get_runs(dg.RunsFilter(created_after=datetime.fromtimestamp(changed, tz=UTC)))
    assert runs and {r.tags.get("dagster/sensor_name") for r in runs} == {"reprocess_on_change"}, [r.tags for r in runs]
    after = _released(store)
    assert url["URL"] not in after["URL"].to_list() and sha["sha256"] not in after["sha256"].to_list()
    assert near["phash"] not in after["phash"].to_list()
    assert not after.filter(pl.col("URL").str.starts_with(prefix)).height
    manifest = store.read_json(paths.release_manifest(SAMPLE_CRAWL))
    assert manifest["removal_version"] == "v000001" and manifest["removed"]["partner request"] > 0
    stats = store.read_json(paths.statistics_json(SAMPLE_CRAWL))
    assert stats["subsets"]["all"]["total"] == after.height < stats_before["subsets"]["all"]["total"]

    result = CliRunner().invoke(cli, ["purge", "--storage", env["LAION_ASSETS_STORAGE"], "--crawl", SAMPLE_CRAWL])
    assert result.exit_code == 0 and " 0 samples purged" not in result.output, result.output
    for tar in sorted(k for k in store.list(paths.crawl_root(SAMPLE_CRAWL)) if k.endswith(".tar")):
        keys = {s["__key__"] for s in wds.WebDataset(store.uri(tar), shardshuffle=False)}
        rows = pl.read_parquet(store.uri(tar.removesuffix(".tar") + ".parquet"))
        assert not keys & set(rows.filter(pl.col("status") == "removed")["key"])
        assert keys == set(rows.filter(pl.col("status") == "success")["key"])
