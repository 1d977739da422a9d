"""The demo's commands of `laion-assets` (loaded by the CLI only when named): the sample crawl, the small offline
models, and the whole graph on them."""

from __future__ import annotations

from typing import Any

import click

from laion_assets.cli_options import options
from laion_assets.core.settings import DEFAULT_SOURCE, ModelSettings, SampleSettings, build


@click.command("sample-crawl")
@click.option("--mirror", default=DEFAULT_SOURCE, show_default=True, help="Directory of the local mirror.")
@options(SampleSettings)
def sample_crawl(mirror: str, **kwargs: Any) -> None:
    """Write the built-in sample crawl as a local Common Crawl mirror."""
    from laion_assets.offline.sample import build_sample_crawl

    report = build_sample_crawl(mirror, build(SampleSettings, kwargs))
    click.echo(f"{report.crawl}: {len(report.wat_files)} WAT files, {report.pages} pages, {report.images} images"
               f" in {report.mirror}")


@click.command("small-models")
@click.option("--models-dir", default=ModelSettings.models_dir, show_default=True)
def small_models(models_dir: str) -> None:
    """Build (once) the small offline CLIPs and heads the tests and the demo use."""
    from laion_assets.offline.small_models import small_models as build_them

    chosen = build_them(models_dir, log=click.echo)
    click.echo(f"{models_dir}: {chosen.clip_en.name} (threshold {chosen.clip_en.threshold:.3f}),"
               f" {chosen.clip_multi.name} (threshold {chosen.clip_multi.threshold:.3f}), safety head,"
               f" {chosen.watermark.name}")


@click.command()
@click.option("--storage", default=None, help="Storage root (default: LAION_ASSETS_STORAGE or ./data).")
def demo(storage: str | None) -> None:
    """Build the sample crawl and materialize the whole asset graph on it, offline."""
    from laion_assets.offline.demo import run_demo

    run_demo(storage)
