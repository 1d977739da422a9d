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
from laion_assets.core.settings import DEFAULT_IMAGE_BASE
from laion_assets.resources import resources_from_env

SAMPLE_PORT = urlsplit(DEFAULT_IMAGE_BASE).port  # where the sample crawl's image links point


def _instance() -> dg.DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and Path("dagster.yaml").exists():
        shutil.copy("dagster.yaml", home / "dagster.yaml")
    return dg.DagsterInstance.get()


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    mats = result.asset_materializations_for_node(node)
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


def run_demo(storage: str | None = None) -> dict[str, Any]:
    from laion_assets.definitions import build_assets

    start = time.perf_counter()
    env = dict(os.environ)
    if storage:
        env["LAION_ASSETS_STORAGE"] = storage
    env.setdefault("LAION_ASSETS_ALLOW_NETWORKS", "127.0.0.1/32")  # the demo's image server
    resources = resources_from_env(env)
    layout = Layout.from_env()
    instance = _instance()
    assets = build_assets(layout)
    by_name = {a.key.to_user_string(): a for a in assets}

    def run(name: str, partition: str | dg.MultiPartitionKey | None = None) -> dg.ExecuteInProcessResult:
        result = dg.materialize(assets, selection=[by_name[name]], partition_key=partition, instance=instance,
                                resources=resources, raise_on_error=True,
                                run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}})
        print(f"  materialized {name}" + (f" [{partition}]" if partition else ""), flush=True)
        return result

    print("laion_assets demo: the sample crawl through the asset graph")
    sample = _meta(run("sample_crawl"), "sample_crawl")
    crawl = sample["crawl"]
    manifest = _meta(run("wat_manifest", crawl), "wat_manifest")
    pairs = 0
    for chunk in layout.chunk_keys():
        pairs += _meta(run("candidate_pairs", dg.MultiPartitionKey({"crawl": crawl, "chunk": chunk})),
                       "candidate_pairs").get("pairs", 0)
    unique = 0
    for bucket in layout.bucket_keys():
        unique += _meta(run("unique_pairs", dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket})),
                        "unique_pairs").get("rows_out", 0)

    statuses: Counter[str] = Counter()
    with image_server(os.path.join(sample["mirror"], "www")):
        for bucket in layout.bucket_keys():
            meta = _meta(run("image_shards", dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket})),
                         "image_shards")
            statuses.update({s: meta.get(s, 0) for s in STATUSES})

    clip_totals: Counter[str] = Counter()
    for bucket in layout.bucket_keys():
        key = dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket})
        scores = _meta(run("clip_scores", key), "clip_scores")
        clip_totals.update({"scored": scores.get("samples", 0), "kept": scores.get("kept", 0)})
        clip_totals["embedded"] += _meta(run("image_embeddings", key), "image_embeddings").get("dagster/row_count", 0)
        clip_totals["unsafe"] += _meta(run("safety_scores", key), "safety_scores").get("unsafe", 0)
        clip_totals["watermarked"] += _meta(run("watermark_scores", key), "watermark_scores").get("watermarked", 0)

    store = resources["storage"].get()
    first_chunk = dg.MultiPartitionKey({"crawl": crawl, "chunk": layout.chunk_keys()[0]})
    summary = {"crawl": crawl, "wat_files": manifest["wat_files"], "pairs": pairs, "unique_pairs": unique,
               "images": statuses["success"], "statuses": dict(statuses), **clip_totals}
    print()
    print(f"Made, in {time.perf_counter() - start:.0f} s:")
    print(f"  sample crawl mirror  {sample['mirror']}  ({sample['wat_files']} WAT files, {sample['pages']} pages,"
          f" {sample['images']} images)")
    first_bucket = layout.bucket_keys()[0]

    def where(key: str) -> str:  # the folder of the first bucket's file: where all buckets' files are
        return store.uri(key.rsplit("/", 1)[0])

    print(f"  wat_manifest         {store.uri(paths.wat_manifest(crawl))}  ({manifest['wat_files']} WAT"
          f" files in {layout.chunks} chunks)")
    print(f"  candidate_pairs      {store.uri(paths.candidates(crawl, layout))}  ({pairs} pairs)")
    print(f"  unique_pairs         {where(paths.unique_pairs(crawl, first_bucket, layout))}  ({unique} unique URLs"
          f" in {layout.buckets} buckets)")
    print(f"  image_shards         {where(paths.image_shards(crawl, first_bucket, layout))}  ({statuses['success']}"
          " images in webdataset shards; " + ", ".join(f"{s} {statuses[s]}" for s in STATUSES[1:]) + ")")
    print(f"  clip_scores          {where(paths.clip_scores(crawl, first_bucket, layout))}  ({clip_totals['scored']}"
          f" scored, {clip_totals['kept']} kept)")
    print(f"  image_embeddings     {store.uri(paths.embeddings(crawl, layout))}  ({clip_totals['embedded']} image and"
          " text embeddings, clip-retrieval layout)")
    print(f"  safety_scores        {where(paths.safety_scores(crawl, first_bucket, layout))}  ({clip_totals['unsafe']}"
          " unsafe)")
    print(f"  watermark_scores     {where(paths.watermark_scores(crawl, first_bucket, layout))}"
          f"  ({clip_totals['watermarked']} watermarked)")
    print("  (small offline models, trained on the synthetic world, cached in data/models/)")
    print()
    print(f"Runs are recorded in {os.environ['DAGSTER_HOME']}; browse them with:")
    print(f"  DAGSTER_HOME={os.environ['DAGSTER_HOME']} .venv/bin/dagster dev     # then open http://127.0.0.1:3000")
    print("To rematerialize image_shards there, serve the sample images and let the guard allow them:")
    print(f"  .venv/bin/python -m http.server {SAMPLE_PORT} --bind 127.0.0.1 -d {sample['mirror']}/www &")
    print("  export LAION_ASSETS_ALLOW_NETWORKS=127.0.0.1/32")
    print("Rematerialize one partition from the command line, e.g.:")
    print(f"  DAGSTER_HOME={os.environ['DAGSTER_HOME']} .venv/bin/dagster asset materialize -m laion_assets.definitions"
          f" --select candidate_pairs --partition '{first_chunk}'")
    return summary
