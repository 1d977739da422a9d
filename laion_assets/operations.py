"""Triggers that run the graph like a data platform: new crawls are registered and processed, missing and failed
partitions are backfilled on a cron. Both launch one backfill (never one run per partition), within the
concurrency pools, and both keep cross-crawl dedup in order: the parse stage of any crawl may run at any time, but
a crawl's dedup (and what follows it) only once every earlier crawl has deduplicated all of its buckets. A third,
`retry_downloads`, gives old downloads' transient failures a second chance.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

from laion_assets import tags
from laion_assets.assets.download import IMAGE_SHARDS
from laion_assets.core.settings import OperationsSettings
from laion_assets.partitions import crawl_partitions
from laion_assets.resources import CrawlSourceResource

TRIGGER_TAG = "laion_assets/trigger"


def crawl_partition_keys(partitions_def: dg.PartitionsDefinition, crawl: str) -> list[str]:
    """The partition keys of one crawl in an asset's partitions (the crawl itself, or crawl x chunk/bucket)."""
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        other = next(d for d in partitions_def.partitions_defs if d.name != "crawl")
        return [str(dg.MultiPartitionKey({"crawl": crawl, other.name: k}))
                for k in other.partitions_def.get_partition_keys()]
    return [crawl]


def _crawl_assets(asset_graph: object) -> list[dg.AssetKey]:
    """The materializable assets partitioned by crawl."""
    keys = []
    for key in sorted(asset_graph.materializable_asset_keys):  # type: ignore[attr-defined]
        partitions_def = asset_graph.get(key).partitions_def  # type: ignore[attr-defined]
        names = ([d.name for d in partitions_def.partitions_defs]
                 if isinstance(partitions_def, dg.MultiPartitionsDefinition) else [])
        if partitions_def == crawl_partitions or "crawl" in names:
            keys.append(key)
    return keys


def _not_done(instance: dg.DagsterInstance, key: dg.AssetKey, partitions_def: dg.PartitionsDefinition,
              wanted: list[str], materialized: set[str]) -> list[str]:
    """Of the wanted partitions, those never materialized, or whose latest run failed."""
    missing = [k for k in wanted if k not in materialized]
    status = instance.get_status_by_partition(key, [k for k in wanted if k in materialized], partitions_def) or {}
    failed = [k for k, s in status.items() if s is not None and s.name == "FAILED"]
    return sorted(set(missing) | set(failed))


def _tagged(asset_graph: object, key: str, *values: str) -> set[dg.AssetKey]:
    selection = dg.AssetSelection.tag(key, values[0])
    for value in values[1:]:
        selection = selection | dg.AssetSelection.tag(key, value)
    return set(selection.resolve(asset_graph))  # type: ignore[arg-type]


def _gate(asset_graph: object, kind: str) -> dg.AssetKey | None:
    """The cross-crawl dedup of this kind (`url` or `image`) that later crawls wait for, if the graph has one."""
    found = sorted(_tagged(asset_graph, tags.CROSS_CRAWL_DEDUP, kind))
    return found[0] if found else None


def plan_work(instance: dg.DagsterInstance, asset_graph: object, crawls: Iterable[str]) -> set[AssetKeyPartitionKey]:
    """The missing and failed partitions of the crawls' assets, oldest crawl first: the parse stage of every crawl;
    the URL dedup and everything after it for crawls whose earlier crawls have all their buckets deduplicated, and
    for the first crawl that does not (its own dedup can then run: the crawls before it are done); likewise the image
    dedup and the release and index stages after it, once every earlier crawl has its image dedup. Stages and
    dedups are found by their tags (`laion_assets/tags.py`)."""
    registered = sorted(instance.get_dynamic_partitions(crawl_partitions.name))
    wanted = set(crawls)
    keys = _crawl_assets(asset_graph)
    free = _tagged(asset_graph, tags.STAGE, *tags.FREE_STAGES)
    late = _tagged(asset_graph, tags.STAGE, *tags.AFTER_IMAGE_DEDUP)
    url_dedup, image_dedup = _gate(asset_graph, "url"), _gate(asset_graph, "image")
    semantic_dedup = _gate(asset_graph, "semantic")  # compares with earlier crawls too: they go first
    materialized = {key: instance.get_materialized_partitions(key) for key in keys}
    work: set[AssetKeyPartitionKey] = set()
    earlier_done = earlier_images_done = True
    for crawl in registered:
        dedup_missing = False
        if url_dedup is not None:
            dedup_def = asset_graph.get(url_dedup).partitions_def  # type: ignore[attr-defined]
            dedup_missing = bool(_not_done(instance, url_dedup, dedup_def, crawl_partition_keys(dedup_def, crawl),
                                           materialized[url_dedup]))
        images_missing = image_dedup is not None and crawl not in materialized[image_dedup]
        images_missing |= semantic_dedup is not None and crawl not in materialized[semantic_dedup]
        if crawl in wanted:
            for key in keys:
                if key not in free and not earlier_done:
                    continue
                if key in late and not earlier_images_done:
                    continue
                partitions_def = asset_graph.get(key).partitions_def  # type: ignore[attr-defined]
                todo = _not_done(instance, key, partitions_def, crawl_partition_keys(partitions_def, crawl),
                                 materialized[key])
                work |= {AssetKeyPartitionKey(key, p) for p in todo}
        earlier_done = earlier_done and not dedup_missing
        earlier_images_done = earlier_images_done and not images_missing
    return work


def backfill_request(asset_graph: object, work: set[AssetKeyPartitionKey], trigger: str) -> dg.RunRequest:
    """One backfill of the work, tagged with the sensor that asked for it. Dagster tags a sensor's runs with
    `dagster/sensor_name` but not its backfills; with the tag the UI shows "Launched by <sensor>" on the backfill
    and on every run it launches."""
    subset = AssetGraphSubset.from_asset_partition_set(work, asset_graph)  # type: ignore[arg-type]
    return dg.RunRequest.for_asset_graph_subset(subset, tags={TRIGGER_TAG: trigger, "dagster/sensor_name": trigger})


TRIGGERS = ("new_crawls", "crawl_backfill")


def backfill_in_flight(instance: dg.DagsterInstance) -> bool:
    """Whether a backfill launched by one of these triggers is still running (the next would do the same work)."""
    return any(instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED],
                                                                tags={TRIGGER_TAG: trigger}))
               for trigger in TRIGGERS)


def register_new_crawls(instance: dg.DagsterInstance, crawl_source: CrawlSourceResource, pattern: str
                        ) -> tuple[list[str], list[str]]:
    """(listed, newly registered): the source's crawls matching the pattern, and those added to `crawls` now."""
    from laion_assets.core.crawl.source import list_crawls

    listed = [c for c in list_crawls(crawl_source.settings(), crawl_source.s3_client()) if re.fullmatch(pattern, c)]
    new = sorted(set(listed) - set(instance.get_dynamic_partitions(crawl_partitions.name)))
    if new:
        instance.add_dynamic_partitions(crawl_partitions.name, new)
    return listed, new


def register_url_list(instance: dg.DagsterInstance, store: object, record: object) -> str:
    """A URL list recorded in storage and added to the crawl dimension as list-NAME (what `lists add` does); the
    partition key. The backfill of its graph is then launched as a crawl's is (the UI, or crawl_backfill)."""
    from laion_assets.core.crawl import url_list

    crawl = url_list.register(store, record)  # type: ignore[arg-type]
    if crawl not in instance.get_dynamic_partitions(crawl_partitions.name):
        instance.add_dynamic_partitions(crawl_partitions.name, [crawl])
    return crawl


def new_crawls_sensor(ops: OperationsSettings) -> dg.SensorDefinition:
    # The selection is what the sensor may backfill (Dagster checks requests against it); no job is built from it.
    @dg.sensor(minimum_interval_seconds=ops.sensor_interval_s, default_status=dg.DefaultSensorStatus.RUNNING,
               asset_selection=dg.AssetSelection.all(), description=f"Registers the crawl source's new crawls matching "
               f"{ops.crawl_pattern!r} and launches one backfill of their whole graph.")
    def new_crawls(context: dg.SensorEvaluationContext, crawl_source: CrawlSourceResource) -> dg.SensorResult:
        # Registered directly (not by a partitions request) so that the backfill below can name them in this tick;
        # the cursor keeps the crawls whose work was launched, so a tick cut short launches it on the next one.
        listed, new = register_new_crawls(context.instance, crawl_source, ops.crawl_pattern)
        launched = set(json.loads(context.cursor)) if context.cursor else set()
        pending = sorted(set(listed) - launched)
        if not pending:
            return dg.SensorResult(skip_reason=f"no new crawl among {len(listed)} listed")
        work = plan_work(context.instance, context.repository_def.asset_graph, pending)
        cursor = json.dumps(sorted(launched | set(pending)))
        if not work:
            return dg.SensorResult(skip_reason=f"{', '.join(pending)}: nothing to do", cursor=cursor)
        context.log.info(f"registered {new or 'no new crawl'}; backfilling {len(work)} partitions of {pending}")
        return dg.SensorResult(run_requests=[backfill_request(context.repository_def.asset_graph, work, "new_crawls")],
                               cursor=cursor)

    return new_crawls


def crawl_backfill_sensor(ops: OperationsSettings) -> dg.SensorDefinition:
    """The backfill on a cron. A sensor that keeps the cron, not a schedule: Dagster 1.13's scheduler cannot submit
    backfills (only the sensor and automation daemons can), and one backfill is the point."""

    @dg.sensor(minimum_interval_seconds=min(ops.sensor_interval_s, 60), default_status=dg.DefaultSensorStatus.RUNNING,
               asset_selection=dg.AssetSelection.all(), description=(
                   f"On the cron {ops.backfill_cron!r}: one backfill of the missing and failed partitions of every "
                   "registered crawl, oldest first (cross-crawl dedup needs that order); skipped while the last one "
                   "runs."))
    def crawl_backfill(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        now = time.time()
        if not context.cursor:  # the first tick starts the clock (new crawls have a sensor of their own)
            return dg.SensorResult(skip_reason=f"first backfill on the cron {ops.backfill_cron!r}", cursor=str(now))
        due = _last_cron_tick(ops.backfill_cron, float(context.cursor), now)
        if due is None:
            return dg.SensorResult(skip_reason=f"next backfill on the cron {ops.backfill_cron!r}")
        cursor = str(due)
        if backfill_in_flight(context.instance):
            return dg.SensorResult(skip_reason="the previous crawl_backfill is still running", cursor=cursor)
        crawls = context.instance.get_dynamic_partitions(crawl_partitions.name)
        work = plan_work(context.instance, context.repository_def.asset_graph, crawls)
        if not work:
            return dg.SensorResult(skip_reason=f"every partition of {len(crawls)} crawls is materialized",
                                   cursor=cursor)
        context.log.info(f"backfilling {len(work)} missing or failed partitions")
        return dg.SensorResult(
            run_requests=[backfill_request(context.repository_def.asset_graph, work, "crawl_backfill")], cursor=cursor)

    return crawl_backfill


def _last_cron_tick(cron: str, after: float, now: float) -> float | None:
    """The latest tick of the cron in (after, now], or None."""
    from croniter import croniter

    ticks = croniter(cron, dt.datetime.fromtimestamp(after, dt.UTC))
    latest = None
    while (tick := ticks.get_next(float)) <= now:
        latest = tick
    return latest


RETRY_TRIGGER = "retry_downloads"


def download_retries(instance: dg.DagsterInstance, after_storage_id: int, now: float, ops: OperationsSettings
                     ) -> tuple[list[dg.RunRequest], int]:
    """Retry runs of the image_shards partitions whose latest download is older than `retry_failed_after_h` and left
    transient failures (its `retryable_failures` metadata) with fewer than `retry_failed_max_runs` runs; and the
    storage id up to which materializations were judged. Materializations are judged once each, oldest first, as
    they come of age: a bucket that is retried materializes again and is judged again when that one is old enough.
    A retry run repeats the config of the run it retries (same shard layout and image settings, so complete shards
    stay complete), with `retry_failed` set."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(IMAGE_SHARDS, after_storage_id=after_storage_id or None,
                              before_timestamp=now - ops.retry_failed_after_h * 3600),
        limit=500, ascending=True).records
    requests: list[dg.RunRequest] = []
    cursor = after_storage_id
    for record in records:
        if len(requests) >= ops.retry_failed_per_tick:
            break
        cursor = record.storage_id
        event = record.asset_materialization
        partition = record.partition_key
        if event is None or partition is None:
            continue
        metadata = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
        if not metadata.get("retryable_failures") or int(metadata.get("runs") or 1) >= ops.retry_failed_max_runs:
            continue
        newer = instance.fetch_materializations(
            dg.AssetRecordsFilter(IMAGE_SHARDS, asset_partitions=[partition], after_storage_id=record.storage_id),
            limit=1).records
        if newer:
            continue  # superseded: that one is judged when it comes of age
        run = instance.get_run_by_id(record.run_id) if record.run_id else None
        config = dict(((run.run_config if run else {}).get("ops", {}).get(IMAGE_SHARDS.path[-1], {})).get("config", {}))
        config["retry_failed"] = True
        requests.append(dg.RunRequest(
            run_key=f"{RETRY_TRIGGER}:{partition}:{record.storage_id}", partition_key=partition,
            asset_selection=[IMAGE_SHARDS], run_config={"ops": {IMAGE_SHARDS.path[-1]: {"config": config}}},
            tags={TRIGGER_TAG: RETRY_TRIGGER}))
    return requests, cursor


def retry_downloads_sensor(ops: OperationsSettings) -> dg.SensorDefinition:
    """A second chance for the real web's hiccups: its own sensor rather than part of crawl_backfill, which
    launches what is missing or failed as one backfill; a retry is a run of one partition with its own config."""

    @dg.sensor(name=RETRY_TRIGGER, minimum_interval_seconds=ops.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING, asset_selection=[IMAGE_SHARDS], description=(
                   f"Re-fetches the transient failures (timeouts, 5xx, 429, resets, temporary DNS failures, "
                   f"unreachable robots.txt) of buckets downloaded more than {ops.retry_failed_after_h:g} h ago, "
                   f"up to {ops.retry_failed_max_runs} downloads per bucket: image_shards with retry_failed."))
    def retry_downloads(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        if ops.retry_failed_after_h <= 0:
            return dg.SensorResult(skip_reason="retries are off (retry_failed_after_h is 0)")
        after = int(context.cursor) if context.cursor else 0
        requests, cursor = download_retries(context.instance, after, time.time(), ops)
        if not requests:
            return dg.SensorResult(skip_reason="no download old enough with transient failures", cursor=str(cursor))
        context.log.info(f"retrying the transient failures of {len(requests)} buckets")
        return dg.SensorResult(run_requests=requests, cursor=str(cursor))

    return retry_downloads
