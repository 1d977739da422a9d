"""`laion-assets`: every stage without Dagster, on local paths, s3:// or https:// URLs.

Each command calls its stage's entry point (`run`), the same function its asset calls. Options come from the
stages' settings dataclasses (`core/settings.py`), as the Dagster config does, so a default is the same in both.
Heavy modules are imported inside the commands, and the demo's commands (`demo`, `sample-crawl`, `small-models`,
in `offline/commands.py`, which imports only click and the settings) are imported only to run or list them, so
production code never loads the rest of the offline package.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from typing import Any

import click

from laion_assets.cli_options import options
from laion_assets.core.paths import Layout
from laion_assets.core.settings import (
    ClipSettings,
    DecontaminationSettings,
    DownloadSettings,
    ExtractSettings,
    FetchSettings,
    IndexSettings,
    ModelSettings,
    ResizeSettings,
    ServeSettings,
    SourceSettings,
    StorageSettings,
    SweepSettings,
    build,
)


class _Commands(click.Group):
    """The group, plus commands that live in other modules and are imported only when used (click's lazy loading)."""

    LAZY = {"demo": "laion_assets.offline.commands:demo",
            "sample-crawl": "laion_assets.offline.commands:sample_crawl",
            "small-models": "laion_assets.offline.commands:small_models"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, _, attr = self.LAZY[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_Commands)
def main() -> None:
    """Common Crawl to a LAION-5B-style image-text dataset."""


def _locate(location: str) -> tuple[Any, str]:
    """(Storage, key) of a file given as a local path or an s3:// URI."""
    from laion_assets.core.storage import Storage

    if location.startswith("s3://"):
        bucket, _, key = location[len("s3://"):].partition("/")
        return Storage(f"s3://{bucket}"), key
    return Storage(os.path.dirname(os.path.abspath(location))), os.path.basename(location)


def _folder(location: str) -> Any:
    """The Storage of a folder given as a local path or an s3:// prefix."""
    from laion_assets.core.storage import Storage

    return Storage(location.rstrip("/") if location.startswith("s3://") else location)


def _bar(total: int | None, unit: str, quiet: bool) -> Any:
    """A progress bar on stderr (none when quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=False)


# --- the Common Crawl stage ----------------------------------------------------------------------------------

@main.command()
@click.argument("wat_files", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Parquet file to write (one row per pair).")
@click.option("--crawl", default="", help="Crawl ID recorded in the `crawl` column.")
@options(ExtractSettings)
@options(SourceSettings, exclude=("base",))
@click.option("--quiet", "-q", is_flag=True, help="Only the summary line.")
def extract(wat_files: tuple[str, ...], output: str, crawl: str, quiet: bool, **kwargs: Any) -> None:
    """Extract (image URL, alt text, language) pairs from WAT files into one Parquet file."""
    from laion_assets.core.crawl import extract as stage

    settings = build(ExtractSettings, kwargs)
    with _bar(len(wat_files), "file", quiet or len(wat_files) < 2) as bar:
        report = stage.run([(w, w) for w in wat_files], crawl, stage.FileTarget(output), settings,
                           build(SourceSettings, kwargs), progress=lambda done, name: bar.update(done - bar.n))
    click.echo(f"{output}: {report.summary()}")
    for name, err in report.failed_files:
        click.echo(f"failed: {name}: {err}", err=True)
    if report.failed_files and settings.fail_on_unreadable_wat:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Parquet file of unique pairs.")
def dedup(inputs: tuple[str, ...], output: str) -> None:
    """Exact dedup of pair files on the normalized URL (first occurrence in crawl order wins)."""
    import glob

    from laion_assets.core.crawl import dedup as stage

    start = time.perf_counter()
    # Local patterns expanded here (the stage reads storage keys, not globs); S3 inputs are named one by one.
    files = [f for i in inputs for f in (sorted(glob.glob(i)) or [i] if not i.startswith("s3://") else [i])]
    missing = [f for f in files if not f.startswith("s3://") and not os.path.isfile(f)]
    if missing:
        raise click.ClickException(f"no such pair file: {', '.join(missing[:5])}")
    located = [_locate(f) for f in files]
    roots = {store.root for store, _ in located}
    if len(roots) > 1 and any(r.startswith("s3://") for r in roots):
        raise click.ClickException("pair files on S3 must share one bucket")
    # Files in several local folders are keys under the filesystem's root.
    store = _folder("/") if len(roots) > 1 else located[0][0]
    keys = [os.path.abspath(f).lstrip("/") for f in files] if len(roots) > 1 else [k for _, k in located]
    try:
        unique, report = stage.run(store, keys)
    except stage.IncompleteChunksError as err:
        raise click.ClickException(str(err)) from err
    out, key = _locate(output)
    with out.staging_dir() as stage_dir:
        local = os.path.join(stage_dir, "unique.parquet")
        unique.sink_parquet(local, compression="zstd")
        out.put_file(local, key)
    click.echo(f"{output}: {report.rows_in} pairs in, {report.rows_out} unique out, "
               f"{time.perf_counter() - start:.2f} s")


# --- the download stage ----------------------------------------------------------------------------------------

@main.command()
@click.argument("urls")
@click.option("--output-dir", "-o", required=True, help="Directory or s3:// prefix for the shards.")
@click.option("--url-col", default="url", show_default=True)
@click.option("--caption-col", default="caption", show_default=True)
@click.option("--language-col", default="language", show_default=True, help="Copied to the metadata if present.")
@click.option("--input-format", default="", help="txt, csv, tsv, json, jsonl or parquet, each also .gz (default: from "
                                                 "the file names).")
@options(DownloadSettings)
@options(ResizeSettings)
@options(FetchSettings)
@click.option("--quiet", "-q", is_flag=True, help="Only the summary line.")
def download(urls: str, output_dir: str, url_col: str, caption_col: str, language_col: str, input_format: str,
             quiet: bool, **kwargs: Any) -> None:
    """Download, resize and write the images of a URL list (a file or folder: local, s3:// or https://) as
    webdataset shards, or img2dataset's files or parquet layouts (resumable)."""
    from laion_assets.core.download import forkserver, process_env

    try:
        settings = build(DownloadSettings, kwargs, fetch=build(FetchSettings, kwargs),
                         resize=build(ResizeSettings, kwargs))
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    process_env.single_threaded_blas()  # before the stage's imports load numpy: this process runs the download only
    if forkserver.processes(settings) > 1:
        # Before the stage's own imports (pyarrow, a fifth of a second), so that they overlap. This module too: the
        # console script imports it, and each worker runs that script as it starts (click and our options, a
        # twentieth of a second a worker).
        forkserver.start(settings, also=(__name__,))

    from laion_assets.core.download.distributor import run as run_download
    from laion_assets.core.download.reader import InputColumns
    with _bar(None, "url", quiet) as bar:
        ok = [0]

        def progress(done: int, succeeded: int) -> None:
            ok[0] += succeeded
            bar.update(done)
            bar.set_postfix(ok=ok[0], refresh=False)

        try:
            report = run_download(urls, _folder(output_dir), "", settings,
                                  InputColumns(url_col, caption_col, language_col, input_format), progress,
                                  None if quiet else lambda m: bar.write(m, file=sys.stderr))
        except ValueError as err:
            raise click.ClickException(str(err)) from err
    click.echo(f"{output_dir}: {report.summary()}")


@main.command("img2dataset", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                              "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def img2dataset_command(args: tuple[str, ...]) -> None:
    """img2dataset 1.47's command line on our download stage: `laion-assets img2dataset --url_list ... --input_format
    ... --output_folder ...` takes its parameters (docs/img2dataset.md); --allow_networks CIDR is ours."""
    from laion_assets.core.download import process_env

    process_env.single_threaded_blas()  # as in `download`, before laion_assets.img2dataset loads numpy
    from laion_assets import img2dataset

    if not args or args[0] in ("--help", "-h"):
        click.echo(img2dataset_command.help)
        click.echo("parameters: " + " ".join(f"--{p}" for p in img2dataset.PARAMETERS))
        return
    try:
        params = img2dataset.parse_command_line(list(args))
        networks = params.pop("allow_networks", ())
        img2dataset.download(**params, allow_networks=(networks,) if isinstance(networks, str) else tuple(networks),
                             log=lambda m: click.echo(m, err=True))
    except (ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from err


# --- the CLIP stage ----------------------------------------------------------------------------------------------

class _ClipGroup(click.Group):
    """Turns the stage's expected errors (an unfinished download, missing or mixed embeddings, a missing
    checkpoint or head) into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from laion_assets.core.clip.aesthetic import NoAestheticHead
        from laion_assets.core.clip.concepts import ConceptFileError
        from laion_assets.core.clip.embeddings import IncompleteEmbeddingsError
        from laion_assets.core.clip.heads import HeadDimensionError, HeadError
        from laion_assets.core.clip.model_files import ModelFileError
        from laion_assets.core.clip.safety import NoSafetyHead
        from laion_assets.core.clip.stage import MissingScoresError
        from laion_assets.core.clip.watermark import WatermarkCheckpointError
        from laion_assets.core.download.plan import IncompleteDownloadError

        try:
            return super().invoke(ctx)
        except (IncompleteDownloadError, IncompleteEmbeddingsError, MissingScoresError, NoSafetyHead, NoAestheticHead,
                HeadDimensionError, HeadError, ModelFileError, ConceptFileError, WatermarkCheckpointError,
                FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err


@main.group(cls=_ClipGroup)
def clip() -> None:
    """The CLIP stage on a finished download (a folder or s3:// prefix with its _manifest.json): `run` computes any
    of the scores, embeddings and watermark scores in one pass over the shards, as the clip_pass asset does; `score`,
    `embed` and `watermark` are `run` for one of them."""


def _clip_run(shards: str, scores: str, embeddings_dir: str | None, index: int, watermark_out: str | None,
              parts: set[str], kwargs: dict[str, Any]) -> None:
    """The one pass for `parts`, the scores at `scores` (read when not computed), and a line per part made."""
    from laion_assets.core import paths
    from laion_assets.core.clip import stage
    from laion_assets.core.clip.registry import resolve
    from laion_assets.core.download.plan import read_manifest

    models = build(ModelSettings, kwargs)
    settings = build(ClipSettings, kwargs, models=models)
    needs = {"scores": (), "embeddings": (), "watermark": ("watermark",)}
    chosen = resolve(models, [f for p in parts for f in needs[p]])  # a missing or wrong file fails here, first
    store = _folder(shards)
    score_store, score_key = _locate(scores)
    stored = score_store.read_parquet(score_key) if score_store.exists(score_key) else None
    if stored is None and stage.Part.SCORES not in parts:
        raise click.ClickException(f"no scores at {scores}: run `laion-assets clip score` (or `run`) first")
    embeddings_at = (_folder(embeddings_dir), paths.embedding_files("", index)) if embeddings_dir else None
    out = stage.run(store, read_manifest(store, ""), chosen, models, parts, stored, embeddings_at,
                    settings.reuse_similarities, lambda m: click.echo(m, err=True))
    if out.scores is not None:
        score_store.write_parquet(score_key, out.scores)
        r = out.score_report
        how = "re-filtered stored similarities" if r.refiltered_only else f"{r.seconds:.1f} s"
        click.echo(f"{scores}: {r.samples} samples, {r.kept} kept, {r.failed} failed to decode ({how})")
    if out.embeddings is not None:
        m = out.embeddings
        click.echo(f"{embeddings_dir}: {m.rows} embeddings of {m.dim} dimensions ({out.embed_report.failed} failed "
                   f"to decode, {out.embed_report.seconds:.1f} s)")
    if out.watermark is not None and watermark_out:
        target, key = _locate(watermark_out)
        target.write_parquet(key, out.watermark)
        click.echo(f"{watermark_out}: {out.watermark_report['samples']} samples, "
                   f"{out.watermark_report['watermarked']} watermarked")


@clip.command("run")
@click.argument("shards")
@click.option("--scores", required=True, help="Parquet file of the scores (a row per sample): written when computed, "
                                              "else read for the kept samples.")
@click.option("--embeddings-dir", default=None, help="Folder or s3:// prefix in clip-retrieval's layout: embeds the "
                                                     "kept samples.")
@click.option("--index", default=0, show_default=True, help="Number of the files: img_emb/img_emb_<index>.npy.")
@click.option("--watermark", "watermark_out", default=None, help="Parquet file of pwatermark per kept sample.")
@click.option("--no-score", is_flag=True, help="Keep the stored scores (only embed or tag their kept samples).")
@options(ClipSettings)
@options(ModelSettings)
def clip_run(shards: str, scores: str, embeddings_dir: str | None, index: int, watermark_out: str | None,
             no_score: bool, **kwargs: Any) -> None:
    """Scores, embeddings and watermark scores of a finished download in one pass: the scores always (re-filtered
    from the stored ones when the weights and images are unchanged) unless --no-score, the others when their output
    is given."""
    parts = {p for p, wanted in (("scores", not no_score), ("embeddings", embeddings_dir), ("watermark",
                                                                                           watermark_out)) if wanted}
    if not parts:
        raise click.ClickException("nothing to compute: give --embeddings-dir or --watermark with --no-score")
    _clip_run(shards, scores, embeddings_dir, index, watermark_out, parts, kwargs)


@clip.command("score")
@click.argument("shards")
@click.option("--output", "-o", required=True, help="Parquet file of scores (a row per sample).")
@options(ClipSettings)
@options(ModelSettings)
def clip_score(shards: str, output: str, **kwargs: Any) -> None:
    """CLIP similarity of every sample and keep; an existing output from the same weights and images is only
    re-filtered with the current thresholds (`clip run` computing the scores alone)."""
    _clip_run(shards, output, None, 0, None, {"scores"}, kwargs)


@clip.command("embed")
@click.argument("shards")
@click.option("--scores", required=True, help="The scores of `clip score`: only kept samples are embedded.")
@click.option("--output-dir", "-o", required=True, help="Folder or s3:// prefix in clip-retrieval's layout.")
@click.option("--index", default=0, show_default=True, help="Number of the files: img_emb/img_emb_<index>.npy.")
@options(ModelSettings)
def clip_embed(shards: str, scores: str, output_dir: str, index: int, **kwargs: Any) -> None:
    """Image and text embeddings of the kept samples (img_emb/, text_emb/, metadata/): `clip run --no-score
    --embeddings-dir`."""
    _clip_run(shards, scores, output_dir, index, None, {"embeddings"}, kwargs)


@clip.command("watermark")
@click.argument("shards")
@click.option("--scores", required=True, help="The scores of `clip score`: only kept samples are tagged.")
@click.option("--output", "-o", required=True, help="Parquet file of pwatermark per sample.")
@options(ModelSettings)
def clip_watermark(shards: str, scores: str, output: str, **kwargs: Any) -> None:
    """pwatermark of every kept sample from the watermark classifier: `clip run --no-score --watermark`."""
    _clip_run(shards, scores, None, 0, output, {"watermark"}, kwargs)


@clip.command("safety")
@click.argument("embeddings")
@click.option("--index", default=0, show_default=True, help="Which img_emb_<index>.npy to score.")
@click.option("--output", "-o", required=True, help="Parquet file of punsafe per sample.")
@options(ModelSettings)
def clip_safety(embeddings: str, index: int, output: str, **kwargs: Any) -> None:
    """punsafe of every embedded sample from the safety head (LAION's AutoKeras zip or PyTorch port, or one of
    ours), and the concept filter's similarities when a concept file is set. EMBEDDINGS: a folder in
    clip-retrieval's layout, ours or clip-retrieval's own."""
    from laion_assets.core import paths
    from laion_assets.core.clip import safety
    from laion_assets.core.clip.registry import resolve

    chosen = resolve(build(ModelSettings, kwargs), ("safety_head", "concepts"))
    table, report = safety.run(_folder(embeddings), paths.embedding_files("", index), chosen,
                               log=lambda m: click.echo(m, err=True))
    store, key = _locate(output)
    store.write_parquet(key, table)
    filtered = f", {report['concept_filtered']} concept-filtered" if "concept_filtered" in report else ""
    click.echo(f"{output}: {report['samples']} samples, {report['unsafe']} unsafe{filtered} ({report['model']})")


@clip.command("aesthetic")
@click.argument("embeddings")
@click.option("--index", default=0, show_default=True, help="Which img_emb_<index>.npy to score.")
@click.option("--output", "-o", required=True, help="Parquet file of the aesthetic score per sample.")
@options(ModelSettings)
def clip_aesthetic(embeddings: str, index: int, output: str, **kwargs: Any) -> None:
    """The aesthetic score of every embedded sample (LAION-Aesthetics V2 or V1, or one of ours). EMBEDDINGS: a
    folder in clip-retrieval's layout, ours or clip-retrieval's own."""
    from laion_assets.core import paths
    from laion_assets.core.clip import aesthetic
    from laion_assets.core.clip.registry import resolve

    table, report = aesthetic.run(_folder(embeddings), paths.embedding_files("", index),
                                  resolve(build(ModelSettings, kwargs), ("aesthetic_head",)))
    store, key = _locate(output)
    store.write_parquet(key, table)
    counts = ", ".join(f">= {t:g}: {report[f'at_least_{t:g}']}" for t in aesthetic.SUBSET_THRESHOLDS)
    click.echo(f"{output}: {report['samples']} samples, mean {report['mean']:.2f} ({counts}; {report['model']})")


# --- models ----------------------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """The model registry: overrides of the model settings, stored under the storage root, that the CLIP stage
    reads at run time. Under the daemon a change re-runs what it affects (a threshold change only re-filters)."""


def _storage_option(command: Any) -> Any:
    # The deployment's root (LAION_ASSETS_STORAGE) unless given: StorageSettings, as the code location reads it.
    return click.option("--storage", default=lambda: StorageSettings.from_env().root,
                        show_default=StorageSettings.root, help="Storage root (local directory or "
                                                                "s3://bucket/prefix).")(command)


@main.group("lists")
def lists() -> None:
    """URL lists as crawls of the graph: `add` registers one as the partition list-NAME of the crawl dimension."""


@lists.command("add")
@click.argument("name")
@click.argument("location")
@click.option("--format", "input_format", default="", help="txt, csv, tsv, json, jsonl or parquet, each also .gz "
                                                           "(default: from the file names).")
@click.option("--url-col", default="url", show_default=True)
@click.option("--caption-col", default="caption", show_default=True)
@click.option("--language-col", default="language", show_default=True, help="Read when present; CLD3 otherwise.")
@click.option("--id-col", default="", help="A column kept as each pair's record_id (e.g. DataComp's uid).")
@_storage_option
def lists_add(name: str, location: str, input_format: str, url_col: str, caption_col: str, language_col: str,
              id_col: str, storage: str) -> None:
    """Register the URL list at LOCATION (a file or folder: local, s3:// or https://) as crawl list-NAME of the
    Dagster instance ($DAGSTER_HOME): its graph then runs as a crawl's, from candidate_pairs on."""
    import dagster as dg

    from laion_assets.core.crawl.url_list import UrlList
    from laion_assets.operations import register_url_list

    record = UrlList(name, location, input_format, url_col, caption_col, language_col, id_col)
    try:
        crawl = register_url_list(dg.DagsterInstance.get(), _folder(storage), record)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"registered {location} as crawl {crawl}")


@models.command("show")
@_storage_option
def models_show(storage: str) -> None:
    """The registry's overrides and the data version of each part of it."""
    import json

    from laion_assets.core.clip.registry import apply_overrides, load_overrides, versions

    store = _folder(storage)
    overrides = load_overrides(store)
    effective = apply_overrides(ModelSettings.from_env(), overrides)
    click.echo(json.dumps({"overrides": overrides, "versions": versions(effective)}, indent=2, sort_keys=True))


@models.command("fetch")
@click.option("--preset", default="laion", show_default=True, type=click.Choice(["laion"]),
              help="The preset whose files to fetch.")
@click.option("--models-dir", default=lambda: ModelSettings.from_env().models_dir,
              show_default=ModelSettings.models_dir, help="Where the files go (in <models-dir>/laion/).")
@click.option("--mirror", default="", help="Fetch from this URL + each file's path instead of its published place "
                                           "(an internal copy for a cluster without internet); sha256 still checked.")
@options(SourceSettings, exclude=("base",))
def models_fetch(preset: str, models_dir: str, mirror: str, **kwargs: Any) -> None:
    """Download every file the preset needs (heads, watermark model, concept file, the search's embeddings) from its
    published location, check its sha256, write it atomically; a rerun resumes a broken download and skips what is
    there. open_clip's weights are open_clip's to fetch (docs/clip.md: pre-fetching them for an offline cluster)."""
    from laion_assets.core.clip.model_files import ModelFileError, fetch
    from laion_assets.core.clip.registry import LAION_FILES, laion_root

    files = [f for group in LAION_FILES.values() for f in group]
    try:
        done = fetch(laion_root(models_dir), files, build(SourceSettings, kwargs), mirror,
                     log=lambda m: click.echo(m, err=True))
    except ModelFileError as err:
        raise click.ClickException(str(err)) from err
    for f in done:
        pin = " (no published digest: pinned now in .sha256)" if f.pinned_now else ""
        click.echo(f"{f.local}: {f.action}, sha256 {f.sha256}{pin}")
    click.echo(f"{preset}: {len(done)} files in {laion_root(models_dir)}")


@models.command("set")
@_storage_option
@options(ModelSettings)
@click.option("--clear", multiple=True, help="Drop an override (a field name), back to the deployment's setting.")
@click.option("--note", default="", help="Why, recorded with the change.")
@click.pass_context
def models_set(ctx: click.Context, storage: str, clear: tuple[str, ...], note: str, **kwargs: Any) -> None:
    """Change the registry: only the options given are set (e.g. --threshold-en 0.3), the others keep their value."""
    from click.core import ParameterSource

    from laion_assets.core.clip.registry import RegistryError, load_overrides, save_overrides

    store = _folder(storage)
    overrides = {k: v for k, v in load_overrides(store).items() if k not in clear}
    given = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    try:
        doc = save_overrides(store, {**overrides, **given}, note)
    except RegistryError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{store.uri('')}: model registry overrides {doc['overrides']}")


@main.command("train-safety")
@click.argument("labelled")
@click.option("--output", "-o", required=True, help="Checkpoint to write (a .json card is written next to it).")
@click.option("--epochs", default=40, show_default=True)
@click.option("--name", default="safety-head", show_default=True, help="Recorded with every score.")
def train_safety(labelled: str, output: str, epochs: int, name: str) -> None:
    """Train the safety head on labelled embeddings: an .npz with `embeddings` (N x D) and `labels` (N, 1 =
    unsafe), e.g. ViT-L/14 image embeddings of a labelled set."""
    import numpy as np

    from laion_assets.core.clip import safety

    data = np.load(labelled)
    for needed in ("embeddings", "labels"):
        if needed not in data:
            raise click.ClickException(f"{labelled} has no array {needed!r} (it has {', '.join(data.files)})")
    x, y = data["embeddings"], data["labels"]
    head = safety.train_safety_head(x, y, epochs=epochs, log=click.echo)
    accuracy = float(((safety.punsafe(head, x) > 0.5) == (y > 0.5)).mean())
    safety.save_safety_head(head, output, {"name": name, "train_accuracy": accuracy, "samples": int(len(y))})
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
    from laion_assets.core.clip import watermark

    images, labels = watermark.load_image_folders(folder, image_size)
    model = watermark.train_watermark(images, labels, arch, epochs=epochs, batch_size=min(batch_size, len(images)),
                                      log=click.echo)
    accuracy = float(((watermark.pwatermark(model, images) > 0.5) == (labels.numpy() == 1)).mean())
    spec = watermark.WatermarkSpec(name or arch, arch, output, image_size, threshold)
    watermark.save_watermark(model, spec, {"train_accuracy": accuracy, "samples": int(len(labels))})
    click.echo(f"{output}: {arch} at {image_size} px, training accuracy {accuracy:.3f} on {len(labels)} images")


# --- the release stage -------------------------------------------------------------------------------------

@main.command("stats")
@click.argument("parquet", nargs=-1, required=True)
@click.option("--json", "json_out", default=None, help="Write the statistics as JSON here.")
@click.option("--markdown", "markdown_out", default=None, help="Write the statistics as Markdown here.")
@click.option("--plots", "plots_dir", default=None, help="Write the PNG plots into this folder.")
def stats_command(parquet: tuple[str, ...], json_out: str | None, markdown_out: str | None,
                  plots_dir: str | None) -> None:
    """The LAION-5B post's statistics of Parquet files with LAION's columns (ours or LAION's own), streamed in
    bounded memory; per `subset` when the files have one, and for all rows. Prints the summary table."""
    import json

    from laion_assets.core.release.statistics import (
        MissingColumnsError,
        compute_statistics,
        summary_table,
        to_markdown,
        write_plots,
    )

    try:
        with contextlib.ExitStack() as stack:
            local = [stack.enter_context(_locate(p)[0].local_copies([_locate(p)[1]]))[0] for p in parquet]
            stats = compute_statistics(local)
    except (MissingColumnsError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(stats, fh, indent=1, sort_keys=True)
    if markdown_out:
        with open(markdown_out, "w") as fh:
            fh.write(to_markdown(stats))
    if plots_dir:
        write_plots(stats, plots_dir)
    click.echo(summary_table(stats))


@main.group()
def removals() -> None:
    """The removal list: append-only versions under the storage root's removals/. Under the daemon a new version
    re-runs the release of every crawl (image dedup, filtered metadata, release, statistics)."""


@removals.command("add")
@_storage_option
@click.option("--url", "urls", multiple=True, help="An exact URL.")
@click.option("--domain", "domains", multiple=True, help="A host and its subdomains, or a URL prefix with its scheme.")
@click.option("--sha256", "sha256s", multiple=True, help="SHA-256 of the image bytes (64 hex digits).")
@click.option("--md5", "md5s", multiple=True, help="MD5 of the URL (32 hex digits).")
@click.option("--phash", "phashes", multiple=True, help="A 64-bit pHash (16 hex digits); each needs a --radius.")
@click.option("--radius", "radii", multiple=True, type=int, help="Hamming radius of the --phash at the same position.")
@click.option("--file", "list_file", default=None, help="A list: `KIND VALUE [RADIUS]` a line (# comments).")
@click.option("--reason", required=True, help="Why (recorded with every entry, counted in the release manifest).")
def removals_add(storage: str, urls: tuple[str, ...], domains: tuple[str, ...], sha256s: tuple[str, ...],
                 md5s: tuple[str, ...], phashes: tuple[str, ...], radii: tuple[int, ...], list_file: str | None,
                 reason: str) -> None:
    """Write the next version of the removal list with these entries (nothing is written if any is malformed)."""
    from laion_assets.core.release import removals as rl

    try:
        if len(phashes) != len(radii):
            raise rl.RemovalEntryError(f"{len(phashes)} --phash given with {len(radii)} --radius: one each")
        entries = [rl.make_entry(kind, v, reason) for kind, values in
                   (("url", urls), ("domain", domains), ("sha256", sha256s), ("md5", md5s)) for v in values]
        entries += [rl.make_entry("phash", h, reason, r) for h, r in zip(phashes, radii, strict=True)]
        if list_file:
            with open(list_file, encoding="utf-8") as fh:
                entries += rl.parse_lines(fh, reason, list_file)
        store = _folder(storage)
        version = rl.add(store, entries)
    except (rl.RemovalEntryError, OSError) as err:
        raise click.ClickException(f"{err} (the removal list is unchanged)") from err
    click.echo(f"{store.uri('removals')}: version {version} with {len(entries)} entries")


@removals.command("list")
@_storage_option
def removals_list(storage: str) -> None:
    """Every version of the removal list with how many entries of each kind it added."""
    from laion_assets.core.release import removals as rl

    rows = rl.summary(_folder(storage))
    if not rows:
        click.echo("no removal list yet")
        return
    click.echo("version  entries  " + "  ".join(rl.KINDS) + "  dates")
    for r in rows:
        click.echo(f"{r['version']}  {r['entries']:7d}  " + "  ".join(f"{r[k]:{len(k)}d}" for k in rl.KINDS)
                   + "  " + ",".join(r["dates"]))


@removals.command("sweep")
@_storage_option
@click.option("--version", "version", type=int, default=None, help="The removal list version whose samples are swept "
                                                                   "(default: the latest).")
@options(SweepSettings)
@click.option("--output", "-o", required=True, help="Parquet file of the candidates: ids, URLs, sha256, pHash, "
                                                    "similarity and the removed sample each neighbours (no images).")
@click.option("--crawl", "crawls", multiple=True, help="Crawl whose kNN index is searched (repeatable; default: every "
                                                       "indexed crawl).")
@click.option("--buckets", type=int, default=lambda: Layout.from_env().buckets, show_default="LAION_ASSETS_BUCKETS",
              help="The layout's buckets (where the removed samples' embeddings are).")
@click.option("--add", is_flag=True, help="Write the candidates as the next removal list version (sha256 entries).")
@click.option("--reason", default="", help="Reason of the entries --add writes.")
def removals_sweep(storage: str, version: int | None, output: str, crawls: tuple[str, ...], buckets: int, add: bool,
                   reason: str, **kwargs: Any) -> None:
    """The indexed samples near what a removal list version removed, as candidate rows for review (a kNN query
    around each removed sample's embedding); with --add --reason, the candidates become the next version."""
    from laion_assets.core.clip.embeddings import EmbeddingModelMismatch
    from laion_assets.core.release import sweep

    if add and not reason.strip():
        raise click.ClickException("--add needs a --reason (recorded with every entry)")
    try:
        report, rows = sweep.run(_folder(storage), Layout(Layout.from_env().chunks, buckets),
                                 build(SweepSettings, kwargs), version, list(crawls) or None,
                                 reason.strip() if add else "", log=lambda m: click.echo(m, err=True))
    except (sweep.NothingToSweep, EmbeddingModelMismatch, KeyError, ValueError) as err:
        raise click.ClickException(str(err).strip("'\"")) from err
    out, key = _locate(output)
    out.write_parquet(key, rows.to_arrow())
    for crawl, why in sorted(report.unavailable.items()):
        click.echo(f"not searched: {crawl}: {why}", err=True)
    click.echo(f"{output}: {report.summary()}")


@main.command("decontaminate")
@click.argument("eval_source")
@click.option("--name", required=True, help="The evaluation set's name (e.g. imagenet-val): the entries' reason is "
                                            "eval:<name>.")
@_storage_option
@click.option("--crawl", "crawls", multiple=True, help="Crawl whose release is checked (repeatable; default: every "
                                                       "released crawl).")
@click.option("--matches", "matches_out", default=None, help="Parquet file of every match: evaluation image, kind, "
                                                             "released sample, similarity or pHash distance.")
@click.option("--dry-run", is_flag=True, help="Report the matches; write nothing to the removal list.")
@options(DecontaminationSettings, exclude=("eval_sets",))
@options(ResizeSettings, exclude=("min_image_size", "max_aspect_ratio", "keep_original"))
@options(ModelSettings, exclude=("clip_en_arch", "clip_en_pretrained", "clip_multi_arch", "clip_multi_pretrained",
                                 "threshold_en", "threshold_multi", "safety_head", "aesthetic_head", "concepts",
                                 "rating_embeddings", "violence_prompts", "watermark_arch", "watermark_checkpoint",
                                 "watermark_image_size", "decode_workers", "decode"))
def decontaminate_command(eval_source: str, name: str, storage: str, crawls: tuple[str, ...],
                          matches_out: str | None, dry_run: bool, **kwargs: Any) -> None:
    """Released samples that are images of an evaluation set (EVAL_SOURCE: a folder of images, a webdataset or an
    embeddings folder) by sha256, pHash within --phash-radius or image cosine >= --min-similarity in the kNN indices,
    written to the removal list as sha256 entries with reason eval:<name>. The resize options are the download's:
    the evaluation images are hashed and embedded as the crawl stored its images."""
    from laion_assets.core.clip.embeddings import EmbeddingModelMismatch
    from laion_assets.core.release import decontaminate as stage

    try:
        report, matches = stage.run(_folder(storage), eval_source, name, build(DecontaminationSettings, kwargs),
                                    build(ModelSettings, kwargs), build(ResizeSettings, kwargs), list(crawls) or None,
                                    dry_run, log=lambda m: click.echo(m, err=True))
    except (stage.EvaluationSourceError, EmbeddingModelMismatch, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    if matches_out:
        out, key = _locate(matches_out)
        out.write_parquet(key, matches.to_arrow())
    for file, why in sorted(report.unreadable.items()):
        click.echo(f"unreadable: {file}: {why}", err=True)
    for crawl, why in sorted(report.not_searched_by_cosine.items()):
        click.echo(f"no cosine search in {crawl}: {why}", err=True)
    click.echo(report.summary() + (" (dry run)" if dry_run and report.entries_added else ""))


@main.command("upgrade-storage")
@_storage_option
@click.option("--chunks", type=int, default=lambda: Layout.from_env().chunks, show_default="LAION_ASSETS_CHUNKS",
              help="The layout's chunks (as the code location has them).")
@click.option("--buckets", type=int, default=lambda: Layout.from_env().buckets, show_default="LAION_ASSETS_BUCKETS",
              help="The layout's buckets.")
def upgrade_storage(storage: str, chunks: int, buckets: int) -> None:
    """Give a storage root written before the IO manager's keys came from the asset key and partition (issue 16) its
    records' new keys: nothing is recomputed; a root already up to date is left as it is."""
    from laion_assets.core import upgrade

    click.echo(f"{storage}: {upgrade.run(_folder(storage), Layout(chunks, buckets)).summary()}")


@main.command("purge")
@_storage_option
@click.option("--crawl", "crawls", multiple=True, help="Crawl to purge (repeatable; default: every crawl stored).")
@click.option("--version", "version", type=int, default=None, help="Removal list version (default: the latest).")
def purge_command(storage: str, crawls: tuple[str, ...], version: int | None) -> None:
    """Rewrite the webdataset shards without the samples the removal list names (atomically; the other samples'
    bytes and the layout unchanged), and mark their Parquet rows `removed`: the images leave storage."""
    from laion_assets.core import paths
    from laion_assets.core.release import removals as rl
    from laion_assets.core.release.purge import purge_crawl, report_line

    store = _folder(storage)
    try:
        removal_list = rl.load(store, version)
    except KeyError as err:
        raise click.ClickException(str(err)) from err
    if not len(removal_list):
        raise click.ClickException("the removal list is empty: nothing to purge")
    chosen = list(crawls) or sorted({k.split("/")[1] for k in store.list("crawls") if "/images/" in k})
    for crawl in chosen:
        if not store.list(paths.crawl_root(crawl)):
            raise click.ClickException(f"no crawl {crawl} in {store.uri('crawls')}")
        click.echo(report_line(crawl, purge_crawl(store, crawl, removal_list)))


# --- the kNN index and the search service ---------------------------------------------------------------------

@main.command("index")
@click.argument("embeddings")
@click.option("--metadata", "metadata_path", required=True,
              help="Parquet file of the index metadata, row-aligned with the embeddings (bucket after bucket).")
@click.option("--output-dir", "-o", required=True,
              help="Folder or s3:// prefix of the index (image.index, text.index, ...).")
@click.option("--exclude", "exclude_path", default=None, help="Parquet file with a `key` column: rows left out.")
@options(IndexSettings, exclude=("min_recall",))  # the floor of the assets' recall check
def index_command(embeddings: str, metadata_path: str, output_dir: str, exclude_path: str | None,
                  **kwargs: Any) -> None:
    """Build the kNN indices of a clip-retrieval embedding folder (img_emb/, text_emb/, metadata/)."""
    import pyarrow.parquet as pq

    from laion_assets.core import paths
    from laion_assets.core.index import crawl as stage

    store = _folder(embeddings)
    exclude = frozenset(pq.read_table(exclude_path, columns=["key"])["key"].to_pylist() if exclude_path else ())
    inputs = stage.IndexInputs([paths.embedding_files("", i) for i in paths.embedding_numbers(store.list("metadata"))],
                               pq.read_table(metadata_path), exclude=exclude)
    record = stage.run(store, inputs, _folder(output_dir), "", os.path.basename(os.path.abspath(output_dir)),
                       build(IndexSettings, kwargs), log=click.echo)
    click.echo(" ".join(f"{k}={v}" for k, v in record.figures.items()))


@main.command("serve")
@click.option("--storage", default=None, help="Local storage root whose indices are served (default: "
                                               "LAION_ASSETS_STORAGE or ./data).")
@options(ServeSettings)
@options(ModelSettings, exclude=("clip_en_arch", "clip_en_pretrained", "clip_multi_arch", "clip_multi_pretrained",
                                 "threshold_en", "threshold_multi", "safety_head", "aesthetic_head", "concepts",
                                 "watermark_arch", "watermark_checkpoint", "watermark_image_size", "batch_size",
                                 "decode_workers"))
def serve_command(storage: str | None, **kwargs: Any) -> None:
    """Serve the storage root's kNN indices: clip-retrieval's API (/knn-service, /metadata, /indices-list) and the
    search page at /."""
    from laion_assets.serve.app import serve
    from laion_assets.serve.encoder import QueryEncoder

    settings = build(ServeSettings, kwargs)
    models = build(ModelSettings, kwargs)
    root = storage or StorageSettings.from_env().root
    if root.startswith("s3://"):
        # faiss maps index files from a local disk, and a service must not download gigabytes at every start:
        # copy the index folders to a local root first (README, "Search": `aws s3 sync`).
        raise click.ClickException(f"serve needs a local storage root, not {root}: copy crawls/*/knn_index and "
                                   "knn_index/all to a local folder (aws s3 sync) and serve that")
    click.echo(f"serving the indices of {root} on http://{settings.host}:{settings.port}/")
    serve(root, settings, QueryEncoder(models), print_fn=click.echo)


if __name__ == "__main__":
    main()
