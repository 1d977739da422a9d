"""`laion-assets`: every stage without Dagster, on local paths, s3:// or https:// URLs."""

from __future__ import annotations

import os
import sys
import time

import click

from laion_assets.core.candidates import ExtractSettings
from laion_assets.core.sample import SampleSettings
from laion_assets.core.wat import DEFAULT_SOURCE, SourceSettings


@click.group()
def main() -> None:
    """Common Crawl to a LAION-5B-style image-text dataset."""


@main.command()
@click.argument("wat_files", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Parquet file to write (one row per pair).")
@click.option("--crawl", default="", help="Crawl ID recorded in the `crawl` column.")
@click.option("--min-text-length", default=ExtractSettings.min_text_length, show_default=True)
@click.option("--max-text-length", default=ExtractSettings.max_text_length, show_default=True)
@click.option("--retries", default=SourceSettings.retries, show_default=True, help="Per remote WAT file.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary line.")
def extract(
    wat_files: tuple[str, ...], output: str, crawl: str, min_text_length: int, max_text_length: int, retries: int,
    quiet: bool,
) -> None:
    """Extract (image URL, alt text, language) pairs from WAT files into one Parquet file."""
    import pyarrow.parquet as pq

    from laion_assets.core.candidates import SCHEMA, extract_locations

    settings = ExtractSettings(min_text_length=min_text_length, max_text_length=max_text_length)
    tmp = output + ".tmp"
    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:

        def progress(done: int, name: str) -> None:
            if not quiet and len(wat_files) > 1:
                click.echo(f"[{done}/{len(wat_files)}] {name}", err=True)

        report = extract_locations(
            ((w, w) for w in wat_files), crawl, writer.write_table, settings, SourceSettings(retries=retries),
            progress=progress,
        )
    os.replace(tmp, output)
    click.echo(f"{output}: {report.summary()}")
    for name, err in report.failed_files:
        click.echo(f"failed: {name}: {err}", err=True)
    if report.failed_files:
        sys.exit(1)


@main.command("sample-crawl")
@click.option("--mirror", default=DEFAULT_SOURCE, show_default=True, help="Directory of the local mirror.")
@click.option("--image-base-url", default=SampleSettings.image_base_url, show_default=True)
@click.option("--wat-files", default=SampleSettings.wat_files, show_default=True)
@click.option("--pages-per-file", default=SampleSettings.pages_per_file, show_default=True)
def sample_crawl(mirror: str, image_base_url: str, wat_files: int, pages_per_file: int) -> None:
    """Write the built-in sample crawl as a local Common Crawl mirror."""
    from laion_assets.core.sample import build_sample_crawl

    report = build_sample_crawl(
        mirror, SampleSettings(image_base_url=image_base_url, wat_files=wat_files, pages_per_file=pages_per_file)
    )
    click.echo(
        f"{report.crawl}: {len(report.wat_files)} WAT files, {report.pages} pages, {report.images} images"
        f" in {report.mirror}"
    )


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Parquet file of unique pairs.")
def dedup(inputs: tuple[str, ...], output: str) -> None:
    """Exact dedup of pair files on the normalized URL (first occurrence in crawl order wins)."""
    import polars as pl

    from laion_assets.core.buckets import unique_by_url

    start = time.perf_counter()
    pairs = pl.scan_parquet(list(inputs))
    rows_in = pairs.select(pl.len()).collect().item()
    tmp = output + ".tmp"
    unique_by_url(pairs).sink_parquet(tmp, compression="zstd")
    os.replace(tmp, output)
    rows_out = pl.scan_parquet(output).select(pl.len()).collect().item()
    click.echo(f"{output}: {rows_in} pairs in, {rows_out} unique out, {time.perf_counter() - start:.2f} s")


@main.command()
@click.option("--storage", default=None, help="Storage root (default: LAION_ASSETS_STORAGE or ./data).")
def demo(storage: str | None) -> None:
    """Build the sample crawl and materialize the whole asset graph on it, offline."""
    from laion_assets.demo import run_demo

    run_demo(storage)


if __name__ == "__main__":
    main()
