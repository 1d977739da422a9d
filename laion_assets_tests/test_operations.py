"""The triggers, evaluated in-process against a real instance: new crawls, the backfill on a cron, the model registry
observations, and the cross-crawl order they keep. (The daemon runs them for real in test_platform.py.)"""

from __future__ import annotations

import time

import dagster as dg
import pytest
from dagster._core.execution.backfill import PartitionBackfill

from laion_assets.core import paths
from laion_assets.core.clip.registry import save_overrides
from laion_assets.core.settings import OperationsSettings, SampleSettings
from laion_assets.definitions import build_definitions
from laion_assets.offline.sample import build_sample_crawl
from laion_assets.operations import TRIGGER_TAG, backfill_request, crawl_partition_keys, plan_work
from laion_assets_tests.graph import LAYOUT, graph_resources

A, B = "CC-MAIN-2099-01", "CC-MAIN-2099-05"


@pytest.fixture
def setup(tmp_path):
    mirror = tmp_path / "mirror"
    for crawl in (A, B):
        build_sample_crawl(mirror, SampleSettings(crawl=crawl, wat_files=2, pages_per_file=2))
    (mirror / paths.crawl_data() / "CC-MAIN-2010-01").mkdir(parents=True)  # no wat.paths.gz: not a crawl
    resources = graph_resources(str(tmp_path / "data"), mirror)
    defs = build_definitions(LAYOUT, resources, OperationsSettings(crawl_pattern=r"CC-MAIN-2099-\d\d"))
    with dg.instance_for_test() as instance:  # persistent, in a temp folder
        yield instance, defs, resources


def sensor_tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = defs.get_sensor_def(name)
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                 resources=defs.resources) as context:
        return sensor(context)


def work_of(request: dg.RunRequest) -> dict[str, set[str]]:
    subset = request.asset_graph_subset
    out: dict[str, set[str]] = {}
    for key, partitions in subset.partitions_subsets_by_asset_key.items():
        out[key.to_user_string()] = set(partitions.get_partition_keys())
    return out


def materialized(instance: dg.DagsterInstance, asset: str, partition_keys: list[str]) -> None:
    for key in partition_keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=key))


def test_new_crawls_are_registered_and_launched_as_one_backfill_in_order(setup):
    instance, defs, _ = setup
    result = sensor_tick(defs, "new_crawls", instance)
    assert instance.get_dynamic_partitions("crawls") == [A, B]  # the pattern and the missing listing kept 2010 out
    (request,) = result.run_requests
    assert request.requires_backfill_daemon() and request.tags[TRIGGER_TAG] == "new_crawls"
    work = work_of(request)
    graph = defs.resolve_asset_graph()
    dedup_def = graph.get(dg.AssetKey("unique_pairs")).partitions_def
    # A's whole graph; B's parse stage only: its dedup needs A's first.
    assert work["unique_pairs"] == set(crawl_partition_keys(dedup_def, A))
    assert work["wat_manifest"] == {A, B}
    assert len(work["candidate_pairs"]) == 2 * LAYOUT.chunks and len(work["clip_scores"]) == LAYOUT.buckets
    again = sensor_tick(defs, "new_crawls", instance, cursor=result.cursor)
    assert not again.run_requests and "no new crawl" in again.skip_reason.skip_message


def test_crawl_backfill_launches_what_is_missing_or_failed_once_earlier_crawls_are_deduplicated(setup):
    instance, defs, _ = setup
    sensor_tick(defs, "new_crawls", instance)
    graph = defs.resolve_asset_graph()
    dedup_def = graph.get(dg.AssetKey("unique_pairs")).partitions_def
    for key in graph.materializable_asset_keys:
        partitions_def = graph.get(key).partitions_def
        if partitions_def is not None:
            materialized(instance, key.to_user_string(), crawl_partition_keys(partitions_def, A))
    # Now A is done: B's dedup and everything after it are due.
    work = work_of(backfill_request(graph, plan_work(instance, graph, [A, B]), "test"))
    assert work["unique_pairs"] == set(crawl_partition_keys(dedup_def, B)) and A not in work["wat_manifest"]
    started = sensor_tick(defs, "crawl_backfill", instance)
    assert not started.run_requests and "first backfill on the cron" in started.skip_reason.skip_message
    first = sensor_tick(defs, "crawl_backfill", instance, cursor=str(float(started.cursor) - 3600))
    (request,) = first.run_requests
    assert request.requires_backfill_daemon() and request.tags[TRIGGER_TAG] == "crawl_backfill"
    quiet = sensor_tick(defs, "crawl_backfill", instance, cursor=first.cursor)
    assert not quiet.run_requests and "next backfill on the cron" in quiet.skip_reason.skip_message
    # While that backfill runs, the next tick launches nothing.
    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id="b1", backfill_timestamp=time.time(), tags=dict(request.tags), dynamic_partitions_store=instance,
        asset_graph_subset=request.asset_graph_subset, title=None, description=None, run_config=None)
    instance.add_backfill(backfill)
    an_hour_ago = str(float(first.cursor) - 3600)
    skip = sensor_tick(defs, "crawl_backfill", instance, cursor=an_hour_ago)
    assert not skip.run_requests and "still running" in skip.skip_reason.skip_message



def test_a_later_crawls_release_stage_waits_for_the_earlier_crawls_image_dedup(setup):
    instance, defs, _ = setup
    sensor_tick(defs, "new_crawls", instance)
    graph = defs.resolve_asset_graph()
    release_stage = {"image_dedup", "semantic_dedup", "filtered_metadata", "release", "dataset_statistics",
                     "knn_index"}
    for key in graph.materializable_asset_keys:  # A done up to its CLIP stage, its image dedup not yet
        partitions_def = graph.get(key).partitions_def
        if partitions_def is not None and key.to_user_string() not in release_stage:
            materialized(instance, key.to_user_string(), crawl_partition_keys(partitions_def, A))
    work = work_of(backfill_request(graph, plan_work(instance, graph, [B]), "test"))
    assert work["unique_pairs"] and work["clip_scores"]  # B's URL dedup and CLIP stage are due
    assert not release_stage & set(work)  # its image dedup would fail without A's
    materialized(instance, "image_dedup", [A])
    work = work_of(backfill_request(graph, plan_work(instance, graph, [B]), "test"))
    assert not release_stage & set(work)  # nor its semantic dedup without A's
    materialized(instance, "semantic_dedup", [A])
    work = work_of(backfill_request(graph, plan_work(instance, graph, [B]), "test"))
    assert work["image_dedup"] == {B} and work["semantic_dedup"] == {B} and work["knn_index"] == {B}

def test_an_earlier_crawls_missing_dedup_refuses_a_later_one(setup, tmp_path):
    from laion_assets.assets.crawl import missing_earlier_buckets

    instance, defs, _ = setup
    sensor_tick(defs, "new_crawls", instance)
    key = dg.AssetKey("unique_pairs")
    assert missing_earlier_buckets(instance, key, [A], "0001") == [A]
    materialized(instance, "unique_pairs", [str(dg.MultiPartitionKey({"crawl": A, "bucket": "0001"}))])
    assert missing_earlier_buckets(instance, key, [A], "0001") == []


def test_model_registry_changes_are_observed_once_each(setup, tmp_path):
    instance, defs, resources = setup
    first = sensor_tick(defs, "observe_models", instance)
    assert {e.asset_key.to_user_string() for e in first.asset_events} == {
        "clip_filter_models", "embedding_model", "safety_model", "watermark_model", "aesthetic_model"}
    quiet = sensor_tick(defs, "observe_models", instance, cursor=first.cursor)
    assert not quiet.asset_events and quiet.skip_reason
    save_overrides(resources["storage"].get(), {"threshold_en": 0.31}, "stricter English filter")
    changed = sensor_tick(defs, "observe_models", instance, cursor=first.cursor)
    assert [e.asset_key.to_user_string() for e in changed.asset_events] == ["clip_filter_models"]
    old = {e.asset_key.to_user_string(): e.tags["dagster/data_version"] for e in first.asset_events}
    assert changed.asset_events[0].tags["dagster/data_version"] != old["clip_filter_models"]


def test_a_malformed_registry_entry_is_refused_and_nothing_changes(setup):
    from laion_assets.core.clip.registry import RegistryError, load_overrides

    _, _, resources = setup
    store = resources["storage"].get()
    save_overrides(store, {"threshold_en": 0.3})
    with pytest.raises(RegistryError, match="not model settings: threshhold_en"):
        save_overrides(store, {"threshhold_en": 0.2})
    assert load_overrides(store) == {"threshold_en": 0.3}


def test_retry_downloads_asks_old_buckets_with_transient_failures_once_each(setup):
    from laion_assets.operations import download_retries

    instance, defs, _ = setup
    sensor_tick(defs, "new_crawls", instance)
    keys = [str(dg.MultiPartitionKey({"crawl": A, "bucket": b})) for b in ("0000", "0001", "0002", "0003")]
    for key, retryable, runs in zip(keys, (5, 0, 2, 1), (1, 1, 3, 1), strict=True):
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "image_shards", partition=key, metadata={"retryable_failures": retryable, "runs": runs}))
    instance.report_runless_asset_event(dg.AssetMaterialization(  # bucket 0003 downloaded again since
        "image_shards", partition=keys[3], metadata={"retryable_failures": 1, "runs": 1}))
    ops = OperationsSettings(retry_failed_after_h=1.0, retry_failed_max_runs=3)
    young, cursor = download_retries(instance, 0, time.time(), ops)
    assert young == [] and cursor == 0  # not an hour old yet
    requests, cursor = download_retries(instance, 0, time.time() + 7200, ops)
    # 0001 has nothing transient, 0002 had its 3 runs, the first 0003 was superseded: 0000 and the second 0003.
    assert [r.partition_key for r in requests] == [keys[0], keys[3]]
    config = requests[0].run_config["ops"]["image_shards"]["config"]
    assert config == {"retry_failed": True} and requests[0].tags[TRIGGER_TAG] == "retry_downloads"
    assert [k.to_user_string() for k in requests[0].asset_selection] == ["image_shards"]
    again, _ = download_retries(instance, cursor, time.time() + 7200, ops)
    assert again == []  # each materialization is judged once
    tick = sensor_tick(defs, "retry_downloads", instance)
    assert tick.skip_reason and not tick.run_requests  # the default age: a day
