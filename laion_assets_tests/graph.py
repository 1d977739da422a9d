"""Running the whole graph in-process on the sample crawl: shared by the asset, operations and demo tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from laion_assets.core import paths
from laion_assets.core.paths import Layout
from laion_assets.core.settings import SAMPLE_CRAWL, OperationsSettings
from laion_assets.definitions import build_assets, resources_from_env
from laion_assets.offline.demo import image_server
from laion_assets.operations import register_new_crawls
from laion_assets.resources import ImageFetchResource

LAYOUT = Layout(chunks=2, buckets=2)
# A failed network step is retried once, at once: tests wait for no backoff.
OPS = OperationsSettings(retry_delay_s=0.05, max_retries=1)
CLIP_STAGE = ("clip_scores", "image_embeddings", "safety_scores", "watermark_scores", "aesthetic_scores")
CLIP_PASS = ("clip_scores", "image_embeddings", "watermark_scores")  # one op, one pass over the shards


def output(asset: str, crawl: str | None = None, bucket: str | None = None, suffix: str = ".parquet",
           layout: Layout = LAYOUT) -> str:
    """Where the IO manager keeps an asset's output for a partition (a crawl, a crawl x bucket, or none)."""
    dims = {k: v for k, v in (("crawl", crawl), ("bucket", bucket)) if v is not None}
    return paths.output_key([asset], dims, layout, suffix)


def graph_resources(storage: str, mirror: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The environment's resources for a storage root and a mirror, the images allowed from loopback."""
    env = {"LAION_ASSETS_STORAGE": storage, "LAION_ASSETS_SOURCE": str(mirror), **(extra_env or {})}
    resources = resources_from_env(env, layout=LAYOUT)
    return {**resources, "image_fetch": ImageFetchResource(allow_networks=["127.0.0.1/32"], deadline_s=5.0)}


class Graph:
    """The assets materialized one partition at a time in one instance; every materialization's metadata and every
    check result is kept."""

    def __init__(self, resources: dict[str, Any], instance: dg.DagsterInstance | None = None) -> None:
        self.resources = resources
        self.instance = instance or dg.DagsterInstance.ephemeral()
        self.assets = build_assets(LAYOUT, OPS)
        # A multi-asset under each of its keys
        self.by = {k.to_user_string(): a for a in self.assets
                   for k in (a.keys if isinstance(a, dg.AssetsDefinition) else [a.key])}
        self.meta: dict[str, list[dict]] = {}
        self.checks: list[Any] = []

    def run(self, name: str, partition: Any = None, config: dict | None = None, also: tuple[str, ...] = ()
            ) -> dg.ExecuteInProcessResult:
        """`name` (and the assets in `also`, in the same run) for one partition."""
        result = dg.materialize(self.assets, selection=dg.AssetSelection.assets(name, *also), partition_key=partition,
                                instance=self.instance, resources=self.resources,
                                run_config={"ops": {name: {"config": config}}} if config else None)
        assert result.success
        for event in result.get_asset_materialization_events():
            m = event.materialization
            self.meta.setdefault(m.asset_key.to_user_string(), []).append({k: v.value for k, v in m.metadata.items()})
        self.checks += result.get_asset_check_evaluations()
        return result

    def per_chunk(self, name: str, crawl: str, config: dict | None = None) -> None:
        for chunk in LAYOUT.chunk_keys():
            self.run(name, dg.MultiPartitionKey({"crawl": crawl, "chunk": chunk}), config)

    def per_bucket(self, name: str, crawl: str, config: dict | None = None) -> None:
        for bucket in LAYOUT.bucket_keys():
            self.run(name, dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}), config)

    def whole_crawl(self, mirror: Path, crawl: str = SAMPLE_CRAWL, clip: bool = True,
                    sample: dict | None = None) -> None:
        """The sample crawl written into the mirror, registered as the new_crawls sensor would, and every stage."""
        (mirror / "www").mkdir(parents=True, exist_ok=True)
        with image_server(str(mirror / "www"), port=0) as base:
            self.run("sample_crawl", config={"image_base_url": base, "crawl": crawl, **(sample or {})})
            register_new_crawls(self.instance, self.resources["crawl_source"], OperationsSettings().crawl_pattern)
            self.crawl(crawl, clip, shard_config={"samples_per_shard": 64})

    def crawl(self, crawl: str, clip: bool = True, shard_config: dict | None = None) -> None:
        """Every stage of a registered crawl whose mirror exists and whose images are served."""
        self.run("wat_manifest", crawl)
        self.per_chunk("candidate_pairs", crawl)
        self.per_bucket("unique_pairs", crawl)
        self.per_bucket("image_shards", crawl, shard_config)
        if clip:
            for bucket in LAYOUT.bucket_keys():  # the one-pass op's three assets in one run
                self.run(CLIP_PASS[0], dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}), also=CLIP_PASS[1:])
            self.per_bucket("safety_scores", crawl)
            self.per_bucket("aesthetic_scores", crawl)


RELEASE_STAGE = ("image_dedup", "semantic_dedup", "filtered_metadata", "release", "dataset_statistics")


def release_crawl(graph: Graph, crawl: str = SAMPLE_CRAWL, config: dict | None = None) -> None:
    """The release stage of a crawl whose CLIP stage ran: image and semantic dedup, filtered metadata per bucket, the
    release (with `config`), its statistics."""
    graph.run("image_dedup", crawl)
    graph.run("semantic_dedup", crawl)
    graph.per_bucket("filtered_metadata", crawl)
    graph.run("release", crawl, config)
    graph.run("dataset_statistics", crawl)
