"""`laion-assets`: every stage without Dagster, on local paths, s3:// or https:// URLs."""

from __future__ import annotations

import os
import sys
import time

import click

from laion_assets.core.settings import (
    ENCODE_FORMATS,
    RESIZE_MODES,
    DownloadSettings,
    ExtractSettings,
    FetchSettings,
    ResizeSettings,
    SampleSettings,
)
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
@click.argument("urls")
@click.option("--output-dir", "-o", required=True, help="Directory or s3:// prefix for the shards.")
@click.option("--url-col", default="url", show_default=True)
@click.option("--caption-col", default="caption", show_default=True)
@click.option("--language-col", default="language", show_default=True, help="Copied to the metadata if present.")
@click.option("--image-size", default=ResizeSettings.image_size, show_default=True)
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=ResizeSettings.resize_mode,
              show_default=True)
@click.option("--encode-format", type=click.Choice(sorted(ENCODE_FORMATS)), default=ResizeSettings.encode_format,
              show_default=True)
@click.option("--encode-quality", default=ResizeSettings.encode_quality, show_default=True)
@click.option("--min-image-size", default=ResizeSettings.min_image_size, show_default=True)
@click.option("--max-aspect-ratio", default=ResizeSettings.max_aspect_ratio, show_default=True)
@click.option("--keep-original", is_flag=True, help="Also store the downloaded bytes as {key}.original.{ext}.")
@click.option("--processes", default=DownloadSettings.processes, show_default=True, help="0: one per CPU core.")
@click.option("--samples-per-shard", default=DownloadSettings.samples_per_shard, show_default=True)
@click.option("--connections", default=FetchSettings.connections, show_default=True, help="Per process.")
@click.option("--per-host", default=FetchSettings.per_host, show_default=True, help="Connections per host.")
@click.option("--deadline", default=FetchSettings.deadline_s, show_default=True, help="Seconds per URL, all in.")
@click.option("--retries", default=FetchSettings.retries, show_default=True, help="On transient errors only.")
@click.option("--user-agent", default=FetchSettings.user_agent, show_default=True)
@click.option("--allow-network", multiple=True, help="CIDR exempt from the address guard (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary line.")
def download(
    urls: str, output_dir: str, url_col: str, caption_col: str, language_col: str, image_size: int,
    resize_mode: str, encode_format: str, encode_quality: int, min_image_size: int, max_aspect_ratio: float,
    keep_original: bool, processes: int, samples_per_shard: int, connections: int, per_host: int,
    deadline: float, retries: int, user_agent: str, allow_network: tuple[str, ...], quiet: bool,
) -> None:
    """Download, resize and write the images of a Parquet URL list as webdataset shards (resumable)."""
    from laion_assets.core import images
    from laion_assets.core.storage import Storage

    settings = DownloadSettings(
        samples_per_shard=samples_per_shard, processes=processes,
        fetch=FetchSettings(connections=connections, per_host=per_host, deadline_s=deadline, retries=retries,
                            user_agent=user_agent, allow_networks=allow_network),
        resize=ResizeSettings(image_size=image_size, resize_mode=resize_mode, encode_format=encode_format,
                              encode_quality=encode_quality, min_image_size=min_image_size,
                              max_aspect_ratio=max_aspect_ratio, keep_original=keep_original),
    )
    s3 = None
    if output_dir.startswith("s3://"):
        import boto3

        s3 = boto3.client("s3")
    tally = {"done": 0, "ok": 0, "shown": 0.0, "start": time.perf_counter()}

    def progress(done: int, ok: int) -> None:
        tally["done"] += done
        tally["ok"] += ok
        now = time.perf_counter()
        if not quiet and now - tally["shown"] >= 2.0:
            tally["shown"] = now
            rate = tally["done"] / max(1e-9, now - tally["start"])
            click.echo(f"{tally['done']} done, {tally['ok']} ok, {rate:.0f}/s", err=True)

    try:
        report = images.download(
            urls, Storage(output_dir.rstrip("/"), s3), "", settings, url_col=url_col, caption_col=caption_col,
            language_col=language_col, progress=progress, log=None if quiet else lambda m: click.echo(m, err=True),
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{output_dir}: {report.summary()}")


@main.command("train-safety")
@click.argument("labelled")
@click.option("--output", "-o", required=True, help="Checkpoint to write (a .json card is written next to it).")
@click.option("--epochs", default=40, show_default=True)
@click.option("--name", default="safety-head", show_default=True, help="Recorded with every score.")
def train_safety(labelled: str, output: str, epochs: int, name: str) -> None:
    """Train the safety head on labelled embeddings: an .npz with `embeddings` (N x D) and `labels` (N, 1 =
    unsafe), e.g. ViT-L/14 image embeddings of a labelled set."""
    import numpy as np

    from laion_assets.core import tags

    data = np.load(labelled)
    for needed in ("embeddings", "labels"):
        if needed not in data:
            raise click.ClickException(f"{labelled} has no array {needed!r} (it has {', '.join(data.files)})")
    x, y = data["embeddings"], data["labels"]
    head = tags.train_safety_head(x, y, epochs=epochs, log=click.echo)
    accuracy = float(((tags.punsafe(head, x) > 0.5) == (y > 0.5)).mean())
    tags.save_safety_head(head, output, {"name": name, "train_accuracy": accuracy, "samples": int(len(y))})
    click.echo(f"{output}: {head.dim}-d safety head, training accuracy {accuracy:.3f} on {len(y)} samples")


@main.command("train-watermark")
@click.argument("folder")
@click.option("--output", "-o", required=True, help="Checkpoint to write (a .json card is written next to it).")
@click.option("--arch", default="efficientnet_b3a", show_default=True, help="A timm model name.")
@click.option("--image-size", default=256, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--threshold", default=0.8, show_default=True, help="pwatermark above it: watermarked.")
@click.option("--name", default="", help="Recorded with every score (default: the arch).")
def train_watermark(folder: str, output: str, arch: str, image_size: int, epochs: int, batch_size: int,
                    threshold: float, name: str) -> None:
    """Train the watermark classifier on labelled image folders: FOLDER/clean/ and FOLDER/watermark/."""
    from laion_assets.core import tags

    images, labels = tags.load_image_folders(folder, image_size)
    model = tags.train_watermark(images, labels, arch, epochs=epochs, batch_size=min(batch_size, len(images)),
                                 log=click.echo)
    accuracy = float(((tags.pwatermark(model, images) > 0.5) == (labels.numpy() == 1)).mean())
    spec = tags.WatermarkSpec(name or arch, arch, output, image_size, threshold)
    tags.save_watermark(model, spec, {"train_accuracy": accuracy, "samples": int(len(labels))})
    click.echo(f"{output}: {arch} at {image_size} px, training accuracy {accuracy:.3f} on {len(labels)} images")


@main.command("small-models")
@click.option("--models-dir", default="data/models", show_default=True)
def small_models_command(models_dir: str) -> None:
    """Build (once) the small offline CLIPs and heads the tests and the demo use."""
    from laion_assets.core.models import small_models

    chosen = small_models(models_dir, log=click.echo)
    click.echo(f"{models_dir}: {chosen.clip_en.name} (threshold {chosen.clip_en.threshold:.3f}),"
               f" {chosen.clip_multi.name} (threshold {chosen.clip_multi.threshold:.3f}), safety head,"
               f" {chosen.watermark.name}")


@main.command()
@click.option("--storage", default=None, help="Storage root (default: LAION_ASSETS_STORAGE or ./data).")
def demo(storage: str | None) -> None:
    """Build the sample crawl and materialize the whole asset graph on it, offline."""
    from laion_assets.demo import run_demo

    run_demo(storage)


if __name__ == "__main__":
    main()
