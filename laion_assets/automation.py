"""Reprocessing on change: what re-runs an asset when something it depends on changes.

Every derived asset carries `REPROCESS`: when an upstream asset partition is updated (re-materialized, or a
versioned source observed with a new data version), the partitions that depend on it are re-run, once nothing
upstream is missing or in progress and every blocking check upstream passed; the UI shows the evaluation that
launched each run. New crawls are not processed by this condition but by backfills (the `new_crawls` sensor and
the `crawl_backfill` schedule), so the two never launch the same partition twice.

Versioned sources: an external input whose changes must flow downstream is an observable source asset whose data
version names its state; a sensor observes it. The model registry is four of them (the filter CLIPs, the
embedding model, the safety head, the watermark classifier); later stages add theirs (the removal list) with
`versioned_sources`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import dagster as dg

# Observable source assets are beta in Dagster 1.13; they are what versioned inputs are for.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*observable_source_asset.*")
REPROCESS = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("reprocess when an upstream changes")


def versioned_sources(names: dict[str, str], resource_key: str, versions_of: Callable[[Any], dict[str, str]],
                      group: str, interval_s: int) -> tuple[list[Any], dg.SensorDefinition]:
    """Observable source assets (name -> description) whose data versions `versions_of(resource)` gives, and the
    sensor that observes them every `interval_s` seconds, recording an observation only when a version changed."""

    def source(name: str, description: str) -> Any:
        @dg.observable_source_asset(name=name, description=description, group_name=group,
                                    required_resource_keys={resource_key})
        def observe(context: dg.AssetExecutionContext) -> dg.DataVersion:
            return dg.DataVersion(versions_of(getattr(context.resources, resource_key))[name])

        return observe

    sources = [source(name, description) for name, description in names.items()]

    @dg.sensor(name=f"observe_{resource_key}", minimum_interval_seconds=interval_s,
               required_resource_keys={resource_key}, default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Observes {', '.join(names)}: a new data version re-runs what depends on it.")
    def observe_sources(context: dg.SensorEvaluationContext, **_resources: Any) -> dg.SensorResult:
        # (Dagster hands required resources to a directly invoked sensor as keyword arguments; the daemon does
        # not. Both reach them through the context.)
        current = versions_of(getattr(context.resources, resource_key))
        seen = json.loads(context.cursor) if context.cursor else {}
        changed = {name: v for name, v in current.items() if name in names and seen.get(name) != v}
        if not changed:
            return dg.SensorResult(skip_reason="no version changed")
        events = [dg.AssetObservation(name, tags={"dagster/data_version": v}, metadata={"data_version": v})
                  for name, v in changed.items()]
        return dg.SensorResult(asset_events=events, cursor=json.dumps({**seen, **changed}, sort_keys=True))

    return sources, observe_sources
