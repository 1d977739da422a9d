"""The code location: one Definitions object for `dagster dev` and `dagster asset materialize`."""

from __future__ import annotations

import dagster as dg

from laion_assets.assets.clip import build_clip_assets
from laion_assets.assets.crawl import build_crawl_assets
from laion_assets.assets.download import build_download_assets
from laion_assets.core.paths import Layout
from laion_assets.resources import resources_from_env


def build_assets(layout: Layout) -> list[dg.AssetsDefinition]:
    crawl = build_crawl_assets(layout)
    unique_pairs = next(a for a in crawl if a.key.to_user_string() == "unique_pairs")
    download = build_download_assets(layout, unique_pairs)
    return [*crawl, *download, *build_clip_assets(layout, download[0])]


def build_definitions(layout: Layout | None = None, resources: dict | None = None) -> dg.Definitions:
    layout = layout or Layout.from_env()
    return dg.Definitions(
        assets=build_assets(layout),
        resources=resources if resources is not None else resources_from_env(),
    )


defs = build_definitions()
