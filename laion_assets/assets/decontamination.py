"""Evaluation-set decontamination as an asset: each crawl's release checked against every registered evaluation
set (`eval_sets`: the run's config, else the deployment's LAION_ASSETS_EVAL_SETS), so that a new crawl is checked
once it is released and indexed. Matches become removal entries (reason `eval:<name>`); the new removal version
re-runs the release stage, after which this asset finds nothing new and writes nothing."""

import dagster as dg

from laion_assets import k8s, tags
from laion_assets.assets.index import KNN_INDEX
from laion_assets.assets.metadata import to_metadata
from laion_assets.assets.release import RELEASE
from laion_assets.automation import REPROCESS
from laion_assets.config import config_class
from laion_assets.core.settings import DecontaminationSettings, OperationsSettings, build
from laion_assets.partitions import crawl_of, crawl_partitions
from laion_assets.resources import ModelRegistryResource, StorageResource

CODE_VERSION = "1"
DECONTAMINATION = dg.AssetKey("decontamination")
DecontaminationConfig = config_class("DecontaminationConfig", DecontaminationSettings,
                                     doc="The evaluation sets checked and what counts as a match.")


def decontamination_asset(ops: OperationsSettings) -> dg.AssetsDefinition:
    @dg.asset(key=DECONTAMINATION, partitions_def=crawl_partitions, kinds={"parquet", "faiss"}, group_name="release",
              tags=tags.stage("release"), op_tags=k8s.cpu_pod(cpu="2", memory="8Gi"), code_version=CODE_VERSION,
              automation_condition=REPROCESS, deps=[RELEASE, KNN_INDEX])
    def decontamination(context: dg.AssetExecutionContext, config: DecontaminationConfig, storage: StorageResource,
                        models: ModelRegistryResource):
        """The crawl's released samples that are images of a registered evaluation set (same sha256, pHash within
        phash_radius, image cosine >= min_similarity in the crawl's kNN index), added to the removal list as sha256
        entries with reason eval:<name>; the matches per kind and set as metadata."""
        from laion_assets.core.release import decontaminate

        crawl = crawl_of(context)
        store = storage.get()
        settings = build(DecontaminationSettings, config)
        registered = settings.registered() or DecontaminationSettings.from_env().registered()
        metadata: dict = {"evaluation_sets": len(registered)}
        if not registered:
            context.log.info("no evaluation set registered (eval_sets, LAION_ASSETS_EVAL_SETS): nothing checked")
        for name, source in sorted(registered.items()):
            report, _ = decontaminate.run(store, source, name, settings, models.settings(), crawls=[crawl],
                                          log=context.log.info)
            context.log.info(f"{crawl}: {report.summary()}")
            for file, why in sorted(report.unreadable.items())[:20]:
                context.log.warning(f"{name}: unreadable {file}: {why}")
            metadata.update({f"{name}/{k}": v for k, v in to_metadata(report.metadata()).items()})
            if report.unreadable:
                metadata[f"{name}/unreadable_files"] = dg.MetadataValue.json(report.unreadable)
        return dg.MaterializeResult(metadata=metadata)

    return decontamination


def build_decontamination_assets(ops: OperationsSettings) -> list:
    return [decontamination_asset(ops)]
