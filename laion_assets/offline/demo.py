"""`make demo`: the whole asset graph that exists, on the built-in sample crawl, offline.

Runs are recorded in the Dagster instance under DAGSTER_HOME (`.dagster_home/` by default), so that
`dagster dev` afterwards shows every materialization with its metadata.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg

from laion_assets.core import paths
from laion_assets.core.download.report import STATUSES
from laion_assets.core.paths import Layout
from laion_assets.core.settings import DEFAULT_IMAGE_BASE, ModelSettings, OperationsSettings
from laion_assets.definitions import build_assets, resources_from_env
from laion_assets.offline.small_models import build_small_models
from laion_assets.operations import register_new_crawls

SAMPLE_PORT = urlsplit(DEFAULT_IMAGE_BASE).port  # where the sample crawl's image links point


def _instance() -> dg.DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and Path("dagster.yaml").exists():
        shutil.copy("dagster.yaml", home / "dagster.yaml")
    return dg.DagsterInstance.get()


def _meta(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    mats = [e.materialization for e in result.get_asset_materialization_events()
            if e.materialization.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in mats[-1].metadata.items()} if mats else {}


@contextlib.contextmanager
def image_server(www: str, port: int = SAMPLE_PORT) -> Iterator[str]:
    """Serve the sample mirror's images on 127.0.0.1, as the sample crawl's links expect (port 0: any)."""
    handler = functools.partial(_QuietHandler, directory=www)
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise SystemExit(f"cannot serve the sample images on 127.0.0.1:{port} ({err});"
                         " is another demo running?") from err
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# What the line of each step shows: (label, metadata entry).
FIGURES: dict[str, list[tuple[str, str]]] = {
    "sample_crawl": [("pages", "pages"), ("images", "images")],
    "wat_manifest": [("WAT files", "wat_files")],
    "candidate_pairs": [("pairs", "pairs")],
    "unique_pairs": [("pairs", "rows_in"), ("unique", "rows_out")],
    "image_shards": [("images", "success"), ("failed", "failed_to_download"), ("not resized", "failed_to_resize"),
                     ("refused by policy", "skipped_by_policy"), ("of which page opt-outs", "skipped_page_opt_out")],
    "clip_scores": [("scored", "samples"), ("kept", "kept")],
    "image_embeddings": [("embedded", "dagster/row_count")],
    "watermark_scores": [("watermarked", "watermarked")],
    "safety_scores": [("unsafe", "unsafe"), ("concept-filtered", "concept_filtered")],
    "aesthetic_scores": [("mean", "mean"), (">= 4.5", "at_least_4.5"), (">= 6.5", "at_least_6.5")],
    "image_dedup": [("exact duplicates", "exact_duplicates"), ("near duplicates", "near_duplicates")],
    "semantic_dedup": [("semantic duplicates", "duplicates"), ("share", "share")],
    "filtered_metadata": [("rows", "rows")],
    "release": [("released", "rows")],
    "dataset_statistics": [],
    "knn_index": [("rows", "rows"), ("recall@10", "recall_at_10")],
    "knn_index_all": [("rows", "rows"), ("recall@10", "recall_at_10")],
}


def _partition_label(partition: str | dg.MultiPartitionKey | None) -> str:
    if isinstance(partition, dg.MultiPartitionKey):
        dims = partition.keys_by_dimension
        return "/".join([dims["crawl"], *(v for d, v in sorted(dims.items()) if d != "crawl")])
    return partition or "-"


def _figures(name: str, meta: dict[str, Any]) -> str:
    shown = []
    for label, key in FIGURES.get(name, []):
        value = meta.get(key)
        if value is None or (value == 0 and label in ("failed", "not resized", "refused by policy")):
            continue
        shown.append(f"{label} {value:.3f}" if isinstance(value, float) else f"{label} {value}")
    return ", ".join(shown)


class _Demo:
    """Materializes assets one partition at a time in the demo's Dagster instance, prints a line per step and adds
    up their metadata. The runs' logs go to the instance (`dagster dev` shows them), not to the terminal."""

    def __init__(self, resources: dict[str, Any], layout: Layout) -> None:
        self.resources, self.layout = resources, layout
        self.instance = _instance()
        self.assets = build_assets(layout)

    def run(self, name: str, partition: str | dg.MultiPartitionKey | None = None) -> dict[str, Any]:
        return self.run_together((name,), partition)[name]

    def run_together(self, names: tuple[str, ...], partition: str | dg.MultiPartitionKey | None = None
                     ) -> dict[str, dict[str, Any]]:
        """Assets of one run (the CLIP pass's three) for one partition: each one's metadata."""
        start = time.perf_counter()
        result = dg.materialize(self.assets, selection=dg.AssetSelection.assets(*names), partition_key=partition,
                                instance=self.instance, resources=self.resources, raise_on_error=True,
                                run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
        seconds = time.perf_counter() - start
        metas = {name: _meta(result, name) for name in names}
        for i, name in enumerate(names):
            took = f"{seconds:5.1f} s" if i == 0 else "(same run)"
            print(f"  {name:<19} {_partition_label(partition):<22} {_figures(name, metas[name]):<52} {took}",
                  flush=True)
        return metas

    def per_bucket(self, name: str, crawl: str) -> list[dict[str, Any]]:
        return [self.run(name, dg.MultiPartitionKey({"crawl": crawl, "bucket": b})) for b in self.layout.bucket_keys()]

    def per_chunk(self, name: str, crawl: str) -> list[dict[str, Any]]:
        return [self.run(name, dg.MultiPartitionKey({"crawl": crawl, "chunk": c})) for c in self.layout.chunk_keys()]


def _total(metas: list[dict[str, Any]], key: str) -> int:
    return sum(m.get(key, 0) for m in metas)


def run_demo(storage: str | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    env = dict(os.environ)
    if storage:
        env["LAION_ASSETS_STORAGE"] = storage
    env.setdefault("LAION_ASSETS_ALLOW_NETWORKS", "127.0.0.1/32")  # the demo's image server
    build_small_models(ModelSettings.from_env(env).models_dir, log=lambda m: print(f"  {m}", flush=True))
    demo = _Demo(resources_from_env(env), Layout.from_env())
    print("laion_assets demo: the sample crawl through the asset graph, a line per step (asset, partition, figures, "
          "seconds)")
    sample = demo.run("sample_crawl")
    crawl = sample["crawl"]
    # What the new_crawls sensor does under the daemon: the mirror's new crawl becomes a `crawls` partition.
    register_new_crawls(demo.instance, demo.resources["crawl_source"], OperationsSettings.from_env().crawl_pattern)
    manifest = demo.run("wat_manifest", crawl)
    pairs = _total(demo.per_chunk("candidate_pairs", crawl), "pairs")
    unique = _total(demo.per_bucket("unique_pairs", crawl), "rows_out")
    with image_server(os.path.join(sample["mirror"], "www")):
        shards = demo.per_bucket("image_shards", crawl)
    statuses = Counter({s: _total(shards, s) for s in STATUSES})
    clip = [demo.run_together(("clip_scores", "image_embeddings", "watermark_scores"),  # one pass per bucket
                              dg.MultiPartitionKey({"crawl": crawl, "bucket": b})) for b in demo.layout.bucket_keys()]
    scores = [c["clip_scores"] for c in clip]
    totals = {"scored": _total(scores, "samples"), "kept": _total(scores, "kept"),
              "embedded": _total([c["image_embeddings"] for c in clip], "dagster/row_count"),
              "unsafe": _total(safety := demo.per_bucket("safety_scores", crawl), "unsafe"),
              "concept_filtered": _total(safety, "concept_filtered"),
              "aesthetic_6_5": _total(demo.per_bucket("aesthetic_scores", crawl), "at_least_6.5"),
              "watermarked": _total([c["watermark_scores"] for c in clip], "watermarked")}
    summary = {"crawl": crawl, "wat_files": manifest["wat_files"], "pairs": pairs, "unique_pairs": unique,
               "images": statuses["success"], "statuses": dict(statuses), **totals}
    summary["release"] = _release(demo, crawl)
    summary["index"] = _index(demo, crawl)
    _print_made(summary, sample, demo.resources["storage"].get(), demo.layout, time.perf_counter() - start)
    _print_release(summary["release"], demo.resources["storage"].get(), crawl)
    _print_index(summary["index"], demo.resources["storage"].get(), crawl)
    return summary


def _release(demo: _Demo, crawl: str) -> dict[str, Any]:
    """The release stage: image and semantic dedup, filtered metadata per bucket, the release and its statistics."""
    dedup = demo.run("image_dedup", crawl)
    semantic = demo.run("semantic_dedup", crawl)
    filtered = demo.per_bucket("filtered_metadata", crawl)
    release = demo.run("release", crawl)
    statistics = demo.run("dataset_statistics", crawl)
    return {"exact_duplicates": dedup.get("exact_duplicates", 0), "near_duplicates": dedup.get("near_duplicates", 0),
            "semantic_duplicates": semantic.get("duplicates", 0),
            "filtered": _total(filtered, "rows"), "released": release.get("rows", 0),
            "subsets": {s: release.get(f"rows_{s}", 0) for s in ("en", "multi", "nolang")},
            "statistics": statistics.get("statistics", "")}


# --- the kNN indices (issue 11) ---------------------------------------------------------------------------------

def _index(demo: _Demo, crawl: str) -> dict[str, Any]:
    """The crawl's kNN indices over its released samples, and `all` (the crawls' indices merged)."""
    return {"crawl": demo.run("knn_index", crawl), "all": demo.run("knn_index_all")}


def _print_index(index: dict[str, Any], store: Any, crawl: str) -> None:
    print()
    print("The kNN indices:")
    for name, key, meta in (("knn_index", paths.knn_index(crawl), index["crawl"]),
                            ("knn_index_all", paths.knn_index_all(), index["all"])):
        print(f"  {name:<20} {store.uri(key)}  ({meta.get('rows', 0)} samples, {meta.get('image_index_key', '')};"
              f" recall@10 {meta.get('recall_at_10', 0):.3f}, p50/p99 {meta.get('image_p50_ms', 0):.2f}/"
              f"{meta.get('image_p99_ms', 0):.2f} ms)")
    print("Search them (clip-retrieval's API and the page) with:")
    print(f"  .venv/bin/laion-assets serve --storage {store.root} --preset small     # then open http://127.0.0.1:1234/")


def _print_release(release: dict[str, Any], store: Any, crawl: str) -> None:
    from laion_assets.core.release.statistics import summary_table

    subsets = ", ".join(f"{s} {n}" for s, n in release["subsets"].items())
    print()
    print(f"The release of {crawl}:")
    print(f"  filtered_metadata    {release['filtered']} samples ({release['exact_duplicates']} exact and"
          f" {release['near_duplicates']} near duplicates marked)")
    print(f"  release              {store.uri(paths.release(crawl))}  ({release['released']} samples: {subsets};"
          f" manifest {paths.RELEASE_MANIFEST})")
    print(f"  dataset_statistics   {store.uri(paths.statistics_markdown(crawl))}  (and statistics.json, plots/*.png)")
    print()
    stats = store.read_json(paths.statistics_json(crawl))
    print(summary_table(stats))


def _print_made(summary: dict[str, Any], sample: dict[str, Any], store: Any, layout: Layout, seconds: float) -> None:
    crawl, statuses, bucket = summary["crawl"], summary["statuses"], layout.bucket_keys()[0]

    def where(key: str) -> str:  # the folder of the first bucket's file: where all buckets' files are
        return store.uri(key.rsplit("/", 1)[0])

    def output(asset: str, bucket: str | None = None) -> str:
        dims = {"crawl": crawl, **({"bucket": bucket} if bucket else {})}
        return paths.output_key([asset], dims, layout, ".parquet")

    others = ", ".join(f"{s} {statuses[s]}" for s in STATUSES[1:])
    print()
    print(f"Made, in {seconds:.0f} s:")
    print(f"  sample crawl mirror  {sample['mirror']}  ({sample['wat_files']} WAT files, {sample['pages']} pages,"
          f" {sample['images']} images)")
    print(f"  wat_manifest         {store.uri(output('wat_manifest'))}  ({summary['wat_files']} WAT files in"
          f" {layout.chunks} chunks)")
    print(f"  candidate_pairs      {store.uri(paths.candidates(crawl, layout))}  ({summary['pairs']} pairs)")
    print(f"  unique_pairs         {where(output('unique_pairs', bucket))}  ({summary['unique_pairs']}"
          f" unique URLs in {layout.buckets} buckets)")
    print(f"  image_shards         {where(paths.image_shards(crawl, bucket, layout))}  ({summary['images']} images in"
          f" webdataset shards; {others})")
    print(f"  clip_scores          {where(output('clip_scores', bucket))}  ({summary['scored']} scored,"
          f" {summary['kept']} kept)")
    print(f"  image_embeddings     {store.uri(paths.embeddings(crawl, layout))}  ({summary['embedded']} image and"
          " text embeddings, clip-retrieval layout)")
    print(f"  safety_scores        {where(output('safety_scores', bucket))}  ({summary['unsafe']} unsafe,"
          f" {summary['concept_filtered']} concept-filtered)")
    print(f"  aesthetic_scores     {where(output('aesthetic_scores', bucket))}  ({summary['aesthetic_6_5']} at"
          " aesthetic >= 6.5)")
    print(f"  watermark_scores     {where(output('watermark_scores', bucket))}  ({summary['watermarked']}"
          " watermarked)")
    print("  (small offline models, trained on the synthetic world, cached in data/models/)")
    home = os.environ["DAGSTER_HOME"]
    first_chunk = dg.MultiPartitionKey({"crawl": crawl, "chunk": layout.chunk_keys()[0]})
    print()
    print(f"Runs are recorded in {home}; browse them with:")
    print(f"  DAGSTER_HOME={home} .venv/bin/dagster dev     # then open http://127.0.0.1:3000")
    print("To rematerialize image_shards there, serve the sample images and let the guard allow them:")
    print(f"  .venv/bin/python -m http.server {SAMPLE_PORT} --bind 127.0.0.1 -d {sample['mirror']}/www &")
    print("  export LAION_ASSETS_ALLOW_NETWORKS=127.0.0.1/32")
    print("Rematerialize one partition from the command line, e.g.:")
    print(f"  DAGSTER_HOME={home} .venv/bin/dagster asset materialize -m laion_assets.definitions"
          f" --select candidate_pairs --partition '{first_chunk}'")
