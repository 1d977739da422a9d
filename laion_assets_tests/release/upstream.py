"""The release stage's upstream outputs (downloads, scores, unique pairs) written straight into a storage root, as
the earlier stages' assets would leave them, so that the release assets can be materialized without the CLIP
stage's models."""

from __future__ import annotations

from typing import Any

import dagster as dg

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import write_embeddings
from laion_assets.core.download.plan import ShardEntry, ShardsManifest
from laion_assets.core.storage import Storage
from laion_assets.offline.release_inputs import BucketInputs, bucket_embeddings, bucket_inputs
from laion_assets_tests.graph import LAYOUT, Graph, graph_resources, output

RELEASE_ASSETS = ("image_dedup", "semantic_dedup", "filtered_metadata", "release", "dataset_statistics")


def write_bucket(store: Storage, crawl: str, bucket: str, inputs: BucketInputs, layout: paths.Layout = LAYOUT,
                 seed: int = 0, shared_images: int = 0) -> None:
    prefix = paths.image_shards(crawl, bucket, layout)
    keys = paths.shard(prefix, "00000")
    store.write_parquet(keys.rows, inputs.rows)
    successes = sum(s == "success" for s in inputs.rows["status"].to_pylist())
    entry = ShardEntry("00000", "00000.tar", "00000.parquet", "00000_stats.json", inputs.rows.num_rows, successes)
    manifest = ShardsManifest(prefix, inputs.rows.num_rows, "synthetic",
                              {"success": successes, "failed_to_download": inputs.rows.num_rows - successes}, [entry])
    store.write_bytes(paths.shards_manifest(prefix), manifest.to_json())
    store.write_bytes(output("image_shards", crawl, bucket, ".json", layout), manifest.to_json())
    store.write_parquet(output("clip_scores", crawl, bucket, layout=layout), inputs.scores)
    store.write_parquet(output("safety_scores", crawl, bucket, layout=layout), inputs.safety)
    store.write_parquet(output("watermark_scores", crawl, bucket, layout=layout), inputs.watermark)
    store.write_parquet(output("aesthetic_scores", crawl, bucket, layout=layout), inputs.aesthetic)
    store.write_parquet(output("unique_pairs", crawl, bucket, layout=layout), inputs.pairs)
    img, meta = bucket_embeddings(inputs, int(bucket), seed=seed, shared_images=shared_images)
    embedded = write_embeddings(store, paths.bucket_embeddings(crawl, bucket, layout), img, img, meta)
    store.write_bytes(output("image_embeddings", crawl, bucket, ".json", layout), embedded.to_json())


def write_crawl(store: Storage, crawl: str, n: int = 400, seed: int = 0, shared_images: int = 5) -> dict[str, Any]:
    """Every bucket of a synthetic crawl; the first `shared_images` images of each bucket are the same bytes."""
    made = {}
    for i, bucket in enumerate(LAYOUT.bucket_keys()):
        made[bucket] = bucket_inputs(n, i, seed=seed, shared_images=shared_images)
        write_bucket(store, crawl, bucket, made[bucket], seed=seed, shared_images=shared_images)
    return made


class ReleaseGraph(Graph):
    """The release assets materialized one partition at a time in one instance, on upstream files written directly
    (no crawl, download or CLIP run); a run may be expected to fail."""

    def run(  # type: ignore[override]
            self, name: str, partition: Any, config: dict | None = None,
            raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        result = dg.materialize(self.assets, selection=[self.by[name]], partition_key=partition,
                                instance=self.instance, resources=self.resources, raise_on_error=raise_on_error,
                                run_config={"ops": {name: {"config": config}}} if config else None)
        for m in result.asset_materializations_for_node(name):
            self.meta.setdefault(name, []).append({k: v.value for k, v in m.metadata.items()})
        self.checks += result.get_asset_check_evaluations()
        return result

    def release(self, crawl: str, config: dict | None = None) -> None:
        """image_dedup, semantic_dedup, every bucket's filtered_metadata, the release, then its statistics."""
        if not self.instance.has_dynamic_partition("crawls", crawl):
            self.instance.add_dynamic_partitions("crawls", [crawl])
        self.run("image_dedup", crawl, config and {"near_radius": config.get("near_radius", 4)})
        self.run("semantic_dedup", crawl, config and {k: v for k, v in config.items() if k.startswith("semantic_")})
        for bucket in LAYOUT.bucket_keys():
            self.run("filtered_metadata", dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}))
        self.run("release", crawl, config)
        self.run("dataset_statistics", crawl)


def report_made(graph: ReleaseGraph, crawl: str, assets: tuple[str, ...]) -> None:
    """The instance learns that the assets' bucket partitions were made (their files were written directly) and
    that their checks passed, as the automation requires of upstream assets."""
    for asset in assets:
        for bucket in LAYOUT.bucket_keys():
            partition = str(dg.MultiPartitionKey({"crawl": crawl, "bucket": bucket}))
            graph.instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))
            # only the asset's own checks: the CLIP pass's multi-asset holds three assets' checks
            for spec in [s for s in graph.by[asset].check_specs if s.asset_key == dg.AssetKey(asset)]:
                graph.instance.report_runless_asset_event(dg.AssetCheckEvaluation(
                    asset_key=spec.asset_key, check_name=spec.name, passed=True, partition=partition))


def local_graph(tmp_path: Any) -> tuple[ReleaseGraph, Storage]:
    """A ReleaseGraph on a local storage root under tmp_path, and its storage."""
    graph = ReleaseGraph(graph_resources(str(tmp_path / "data"), tmp_path / "mirror"))
    return graph, graph.resources["storage"].get()
