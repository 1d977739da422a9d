"""The tags every asset carries and the operations select assets by (`AssetSelection.tag`), so that no module but
an asset's own names it: the stage it belongs to, and whether it is a cross-crawl dedup that later crawls wait for.

The parse stage runs for any crawl in any order; every later stage of a crawl waits until each earlier crawl's URL
dedup is done (it deduplicates against them), and the release and index stages also wait for each earlier crawl's
image dedup (operations.py).
"""

from __future__ import annotations

STAGE = "laion_assets/stage"
CROSS_CRAWL_DEDUP = "laion_assets/cross_crawl_dedup"
STAGES = ("parse", "dedup", "download", "clip", "release", "index")
FREE_STAGES = ("parse",)  # any crawl, any order
AFTER_IMAGE_DEDUP = ("release", "index")


def stage(name: str, cross_crawl_dedup: str | None = None) -> dict[str, str]:
    """An asset's tags: its stage, and `url`, `image` or `semantic` for the dedup that compares a crawl with earlier
    ones."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {name!r}")
    return {STAGE: name, **({CROSS_CRAWL_DEDUP: cross_crawl_dedup} if cross_crawl_dedup else {})}
