"""The kNN indices: `knn_index` (per crawl, from its embeddings and filtered metadata) and `knn_index_all` (the
crawls' indices merged), what `laion-assets serve` serves. Both re-run through the automation when what they are
built from changes: a new removal version re-runs the filtered metadata, then the crawl's index, then `all`."""

import dagster as dg

from laion_assets import k8s, tags
from laion_assets.assets import checks
from laion_assets.assets.clip import IMAGE_EMBEDDINGS
from laion_assets.assets.metadata import to_metadata
from laion_assets.assets.release import FILTERED_METADATA
from laion_assets.automation import REPROCESS
from laion_assets.config import config_class
from laion_assets.core import paths
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.index.records import IndexRecord
from laion_assets.core.paths import Layout
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.settings import IndexSettings, OperationsSettings, build
from laion_assets.partitions import crawl_of, crawl_partitions, to_crawl
from laion_assets.resources import RemovalListResource, StorageResource

CODE_VERSION = "1"
KNN_INDEX = dg.AssetKey("knn_index")
IndexConfig = config_class("IndexConfig", IndexSettings, doc="How the kNN indices are built and measured.")
# `all` merges whichever crawls are indexed: unlike REPROCESS it does not wait for every registered crawl (a crawl
# still being processed would hold back every other crawl's change), only for none to be in progress.
MERGE_ON_CHANGE = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("merge again when a crawl's index changes")


def recall_check(asset: str, record: IndexRecord, floor: float) -> dg.AssetCheckResult:
    recall = record.recall()
    return checks.holds(asset, "recall", recall >= floor,
                        f"recall@10 {recall:.3f} (the lower of image and text) against the floor {floor}",
                        recall_at_10=round(recall, 4), floor=floor)


def knn_index_asset(layout: Layout, ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=crawl_partitions, kinds={"faiss", "arrow"}, group_name="index", tags=tags.stage("index"),
              op_tags=k8s.cpu_pod(cpu="8", memory="12Gi"), code_version=CODE_VERSION, automation_condition=REPROCESS,
              ins={"image_embeddings": dg.AssetIn(IMAGE_EMBEDDINGS, partition_mapping=to_crawl),
                   "filtered_metadata": dg.AssetIn(FILTERED_METADATA, partition_mapping=to_crawl)},
              check_specs=[checks.spec("knn_index", "recall", "recall@10 of the image and text indices against "
                                                              "exact search is above IndexSettings.min_recall")])
    def knn_index(context: dg.AssetExecutionContext, config: IndexConfig, storage: StorageResource,
                  image_embeddings: dict[str, EmbeddingsManifest], filtered_metadata: dict[str, FilteredBucket]):
        """The crawl's image and text kNN indices (autofaiss) over the samples of its filtered metadata (removed
        samples and the duplicates the release drops left out), with `metadata.arrow` row-aligned: URL, caption,
        key, shard, WIDTH, HEIGHT, similarity, punsafe, pwatermark, LANGUAGE, tar, sha256, phash."""
        from laion_assets.core.index import crawl as stage

        crawl = crawl_of(context)
        store = storage.get()
        settings = build(IndexSettings, config)
        inputs = stage.crawl_inputs(store, image_embeddings, filtered_metadata)
        record = stage.run(store, inputs, store, paths.knn_index(crawl), crawl, settings, log=context.log.info)
        metadata = to_metadata(record.metadata())
        # (dagster/uri is the stored record, which the IO manager sets)
        metadata.update({"folder": store.uri(record.folder), "dagster/row_count": record.rows})
        return dg.MaterializeResult(value=record, metadata=metadata,
                                    check_results=[recall_check("knn_index", record, settings.min_recall)])

    return knn_index


def knn_index_all_asset(ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(kinds={"faiss", "arrow"}, group_name="index", tags=tags.stage("index"),
              op_tags=k8s.cpu_pod(cpu="8", memory="12Gi"), code_version=CODE_VERSION,
              automation_condition=MERGE_ON_CHANGE, deps=[KNN_INDEX],
              check_specs=[checks.spec("knn_index_all", "recall", "recall@10 of the merged indices against exact "
                                                                  "search is above IndexSettings.min_recall")])
    def knn_index_all(context: dg.AssetExecutionContext, config: IndexConfig, storage: StorageResource,
                      removals: RemovalListResource):
        """Every indexed crawl's indices merged into one (IVF with on-disk inverted lists), the `all` indice of the
        search service; the metadata gains an `indice` column naming each row's crawl."""
        from laion_assets.core.index.crawl import below_recall_floor, merge_crawl_indices

        store = storage.get()
        settings = build(IndexSettings, config)
        done = context.instance.get_materialized_partitions(KNN_INDEX)
        crawls = sorted(c for c in done if store.exists(paths.index_files(paths.knn_index(c)).report))
        low = below_recall_floor(store, crawls, settings.min_recall)
        if low:
            context.log.warning(f"left out of the merge, recall@10 below {settings.min_recall}: {low}")
        crawls = [c for c in crawls if c not in low]
        if not crawls:
            raise dg.Failure("no crawl has a complete kNN index above the recall floor yet: materialize knn_index "
                             f"first{f' (below the floor: {low})' if low else ''}")
        record = merge_crawl_indices(store, crawls, settings, removals.load().version, log=context.log.info)
        metadata = to_metadata(record.metadata())
        # (dagster/uri is the stored record, which the IO manager sets)
        metadata.update({"folder": store.uri(record.folder), "dagster/row_count": record.rows,
                         "crawls": len(crawls), "left_out_below_recall_floor": dg.MetadataValue.json(low)})
        return dg.MaterializeResult(value=record, metadata=metadata,
                                    check_results=[recall_check("knn_index_all", record, settings.min_recall)])

    return knn_index_all


def build_index_assets(layout: Layout, ops: OperationsSettings) -> list:
    return [knn_index_asset(layout, ops), knn_index_all_asset(ops)]
