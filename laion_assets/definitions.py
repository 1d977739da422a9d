"""The code location: one Definitions object for `dagster dev` and `dagster asset materialize`."""

from __future__ import annotations

import dagster as dg

from laion_assets.assets.crawl import build_crawl_assets
from laion_assets.partitions import Layout
from laion_assets.resources import resources_from_env


def build_definitions(layout: Layout | None = None, resources: dict | None = None) -> dg.Definitions:
    layout = layout or Layout.from_env()
    return dg.Definitions(
        assets=[*build_crawl_assets(layout)],
        resources=resources if resources is not None else resources_from_env(),
    )


defs = build_definitions()
