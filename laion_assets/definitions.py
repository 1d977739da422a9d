"""The code location: the one place that decides what a deployment loads, and its Definitions object for `dagster
dev`, the daemon and `dagster asset materialize`.

`LAION_ASSETS_DEPLOYMENT` (OperationsSettings.deployment) is `local` (the default: production's assets plus the
demo's `sample_crawl`) or `production`; the resources come from the environment in both (a local storage root and
crawl source unless the variables say otherwise), as Dagster's project_fully_featured chooses its resources by
deployment name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from laion_assets.assets.clip import build_clip_assets, model_sources
from laion_assets.assets.crawl import build_crawl_assets
from laion_assets.assets.decontamination import build_decontamination_assets
from laion_assets.assets.download import build_download_assets
from laion_assets.assets.index import build_index_assets
from laion_assets.assets.release import build_release_assets, removal_sources
from laion_assets.core.paths import Layout
from laion_assets.core.settings import FetchSettings, ModelSettings, OperationsSettings, SourceSettings, StorageSettings
from laion_assets.io_manager import StorageIOManager
from laion_assets.k8s import executor
from laion_assets.operations import crawl_backfill_sensor, new_crawls_sensor, retry_downloads_sensor
from laion_assets.resources import (
    ChecksResource,
    CrawlSourceResource,
    ImageFetchResource,
    ModelRegistryResource,
    RemovalListResource,
    StorageResource,
)


def resources_from_env(env: Mapping[str, str] | None = None, layout: Layout | None = None) -> dict[str, Any]:
    """The resources for this environment: local paths unless the variables say otherwise."""
    layout = layout or Layout.from_env(env)
    where = StorageSettings.from_env(env)
    models = ModelSettings.from_env(env)
    s3 = S3Resource(endpoint_url=where.endpoint_url or None, region_name=where.region or None)
    storage = StorageResource(root=where.root, s3=s3)
    return {
        "storage": storage,
        "io_manager": StorageIOManager(storage=storage, chunks=layout.chunks, buckets=layout.buckets),
        "crawl_source": CrawlSourceResource(base=SourceSettings.from_env(env).base),
        "models": ModelRegistryResource(storage=storage, preset=models.preset, models_dir=models.models_dir),
        "image_fetch": ImageFetchResource(allow_networks=list(FetchSettings.from_env(env).allow_networks)),
        "check_bands": ChecksResource(),
        "removals": RemovalListResource(storage=storage),
    }


def build_assets(layout: Layout, ops: OperationsSettings | None = None) -> list:
    """Every asset and source the deployment loads (what `dg.materialize` needs in tests and the demo)."""
    ops = ops or OperationsSettings()
    sources, _ = model_sources(ops)
    assets = [*sources, *build_crawl_assets(layout, ops), *build_download_assets(layout, ops),
              *build_clip_assets(layout, ops), *build_release_assets(layout, ops), *build_index_assets(layout, ops),
              *build_decontamination_assets(ops)]
    if ops.deployment == "local":
        # The demo's own asset: imported only here, so that a production code location never loads offline/.
        from laion_assets.offline.assets import local_assets

        assets += local_assets()
    return assets


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
        sensors=[new_crawls_sensor(ops), crawl_backfill_sensor(ops), retry_downloads_sensor(ops), observe_models,
                 reprocess, observe_removals],
        resources=resources if resources is not None else resources_from_env(layout=layout),
        # By default a run's steps run in its own process (a run is one partition of a few dependent assets, and a
        # process start per step costs seconds); production uses a pod per step (laion_assets/k8s.py).
        executor=executor(ops),
    )


defs = build_definitions()
