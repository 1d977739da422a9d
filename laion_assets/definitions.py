"""The code location: one Definitions object for `dagster dev`, the daemon and `dagster asset materialize`."""

from __future__ import annotations

import dagster as dg

from laion_assets.assets.clip import build_clip_assets, model_sources
from laion_assets.assets.crawl import build_crawl_assets
from laion_assets.assets.download import build_download_assets
from laion_assets.assets.index import build_index_assets
from laion_assets.assets.release import build_release_assets, removal_sources
from laion_assets.core.paths import Layout
from laion_assets.core.settings import OperationsSettings
from laion_assets.k8s import executor
from laion_assets.operations import crawl_backfill_sensor, new_crawls_sensor
from laion_assets.resources import resources_from_env


def build_assets(layout: Layout, ops: OperationsSettings | None = None) -> list:
    """Every asset and source of the graph (what `dg.materialize` needs in tests and the demo)."""
    ops = ops or OperationsSettings()
    sources, _ = model_sources(ops)
    return [*sources, *build_crawl_assets(layout, ops), *build_download_assets(layout, ops),
            *build_clip_assets(layout, ops),
            *build_release_assets(layout, ops),
            *build_index_assets(layout, ops)]


def build_definitions(layout: Layout | None = None, resources: dict | None = None,
                      ops: OperationsSettings | None = None) -> dg.Definitions:
    layout = layout or Layout.from_env()
    ops = ops or OperationsSettings.from_env()
    _, observe_models = model_sources(ops)
    _, observe_removals = removal_sources(ops)
    reprocess = dg.AutomationConditionSensorDefinition(
        "reprocess_on_change", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=ops.sensor_interval_s,
        description="Re-runs the partitions downstream of anything that changed (see automation.py).")
    return dg.Definitions(
        assets=build_assets(layout, ops),
        sensors=[new_crawls_sensor(ops), crawl_backfill_sensor(ops), observe_models, reprocess,
                 observe_removals],
        resources=resources if resources is not None else resources_from_env(layout=layout),
        # By default a run's steps run in its own process (a run is one partition of a few dependent assets, and a
        # process start per step costs seconds); production uses a pod per step (laion_assets/k8s.py).
        executor=executor(ops),
    )


defs = build_definitions()
