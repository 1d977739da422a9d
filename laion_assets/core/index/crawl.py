"""The kNN indices of the asset graph: a crawl's index built from its embeddings and its filtered metadata, the
crawls' indices merged into `all`, both stored under the storage root, and the removals newer than an index
matched against its rows for the service to filter out until the rebuild.

Only samples that are in the crawl's filtered metadata are indexed (so removed samples never are), less the
duplicates that the release drops (`ReleaseSettings`): the index holds what the release holds. faiss reads and
writes local files only: the index is built in `Storage.output_folder` (its folder on a local storage root; on S3 a
local temporary folder uploaded file by file, `_report.json` last, as it marks the folder complete), and the indices
merged are read from `Storage.input_folder`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.core import paths
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.index import metadata as meta
from laion_assets.core.index.build import IndexReport, build_index
from laion_assets.core.index.merge import merge_indices
from laion_assets.core.index.records import IndexFile, IndexRecord
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.settings import IndexSettings, ReleaseSettings
from laion_assets.core.storage import Storage, file_sha256

REPORT = paths.INDEX_REPORT


def index_rows(embeddings: Mapping[str, EmbeddingsManifest], filtered: Mapping[str, FilteredBucket],
               store: Storage, release: ReleaseSettings | None = None) -> tuple[pa.Table, np.ndarray]:
    """The index metadata row-aligned with the buckets' embeddings (buckets in sorted order, each in its embeddings'
    row order) and the mask of rows to index: present in the filtered metadata and not a duplicate that the
    release drops. Rows left out carry nulls (build_index drops them with the mask)."""
    release = release or ReleaseSettings()
    missing = sorted(set(embeddings) ^ set(filtered))
    if missing:
        raise ValueError(f"buckets {missing} have embeddings or filtered metadata but not both")
    tables, masks = [], []
    for bucket in sorted(embeddings):
        keys = pl.from_arrow(store.read_parquet(embeddings[bucket].files.metadata, columns=["key"]))
        rows = pl.from_arrow(store.read_parquet(filtered[bucket].file))
        assert isinstance(keys, pl.DataFrame) and isinstance(rows, pl.DataFrame)
        drop = pl.lit(False)
        if release.drop_exact_duplicates:
            drop = drop | pl.col("duplicate_of").is_not_null()
        if release.drop_near_duplicates:
            drop = drop | pl.col("near_duplicate_of").is_not_null()
        if release.drop_semantic_duplicates and "semantic_duplicate_of" in rows.columns:
            drop = drop | pl.col("semantic_duplicate_of").is_not_null()
        rows = rows.select(
            "URL", pl.col("TEXT").alias("caption"), "key", "shard", "WIDTH", "HEIGHT", "similarity", "punsafe",
            "pwatermark", "LANGUAGE", pl.col("shard").alias("tar"), "sha256", "phash",
            *(["aesthetic"] if "aesthetic" in rows.columns else []), (~drop).alias("_keep"))
        # A left join in the embeddings' order: a sample embedded but not in the filtered metadata was removed.
        joined = keys.join(rows, on="key", how="left", maintain_order="left")
        masks.append(joined["_keep"].fill_null(False).to_numpy())
        tables.append(joined.drop("_keep").to_arrow())
    if not tables:
        return meta.conform(meta.empty()), np.zeros(0, bool)
    return meta.conform(pa.concat_tables([meta.conform(t) for t in tables])), np.concatenate(masks)



def _files(folder: str) -> list[IndexFile]:
    return [IndexFile(n, os.path.getsize(os.path.join(folder, n)), file_sha256(os.path.join(folder, n)))
            for n in sorted(os.listdir(folder)) if not n.startswith(".")]


def _record(name: str, key: str, folder: str, report: IndexReport, removal_version: str) -> IndexRecord:
    return IndexRecord(name, key, report.rows, report.excluded, removal_version, report.parts, _files(folder),
                       report.metadata())


@dataclass(frozen=True)
class IndexInputs:
    """What an index is built from: the embedding files in bucket order, the metadata row-aligned with them, which
    rows to index (None: all but `exclude`'s keys), and the removal list version they reflect."""

    buckets: list[EmbeddingKeys]
    table: pa.Table
    keep_rows: np.ndarray | None = None
    exclude: frozenset[str] = frozenset()
    removal_version: str = ""


def crawl_inputs(store: Storage, embeddings: Mapping[str, EmbeddingsManifest], filtered: Mapping[str, FilteredBucket],
                 release: ReleaseSettings | None = None) -> IndexInputs:
    """A crawl's index inputs: every bucket's embeddings, and the rows its filtered metadata keeps."""
    table, keep = index_rows(embeddings, filtered, store, release)
    return IndexInputs([embeddings[b].files for b in sorted(embeddings)], table, keep,
                       removal_version=max((f.removal_version for f in filtered.values()), default=""))


def run(store: Storage, inputs: IndexInputs, out: Storage, key: str, name: str, settings: IndexSettings,
        log: Log | None = None) -> IndexRecord:
    """The index stage's entry point: the image and text indices of the embeddings in `store` (and their metadata)
    built into `key` of `out` (on S3 built locally and uploaded, the report last), and the record of what was made.
    The knn_index asset and `laion-assets index` call it."""
    with out.output_folder(key, last=REPORT) as folder:
        report = build_index(store, inputs.buckets, inputs.table, folder, settings, exclude=inputs.exclude, log=log,
                             keep_rows=inputs.keep_rows)
        return _record(name, key, folder, report, inputs.removal_version)


def below_recall_floor(store: Storage, crawls: list[str], floor: float) -> dict[str, float]:
    """{crawl: recall@10} of the crawls whose index measured a recall@10 (the lower of image and text) below
    `floor`: the blocking check failed them, so merging them would carry a bad index into `all`. An index built
    without measuring (eval_queries 0) is not held back."""
    low: dict[str, float] = {}
    for crawl in crawls:
        report = IndexReport.from_json(store.read_bytes(paths.index_files(paths.knn_index(crawl)).report))
        measured = [float(r.quality["recall_at_10"]) for r in (report.image, report.text)
                    if "recall_at_10" in r.quality]
        if measured and min(measured) < floor:
            low[crawl] = min(measured)
    return low


def merge_crawl_indices(store: Storage, crawls: list[str], settings: IndexSettings, removal_version: str = "",
                        log: Log | None = None) -> IndexRecord:
    """The crawls' indices (complete ones, in crawl order) merged into `paths.knn_index_all()`."""
    key = paths.knn_index_all()
    with contextlib.ExitStack() as stack:
        parts = {crawl: stack.enter_context(store.input_folder(paths.knn_index(crawl))) for crawl in sorted(crawls)}
        with store.output_folder(key, last=REPORT) as out:
            report = merge_indices(parts, out, settings, log=log)
            record = _record(paths.ALL_INDICES, key, out, report, removal_version)
    return record


def removed_since_build(folder: str, removal_list: Any) -> set[int]:
    """Ids (rows) of the index in a local folder that `removal_list` (a `removals.RemovalList`) removes: samples
    removed after the index was built, to be filtered out at query time until the rebuild leaves them out. Rows,
    not keys: keys repeat across buckets and crawls."""
    if not len(removal_list):
        return set()
    table = meta.open_arrow(paths.index_files(folder).metadata)
    columns = [c for c in ("URL", "sha256", "phash", "key") if c in table.column_names]
    matched = removal_list.match(table.select(columns))
    return set(pc.indices_nonzero(pc.fill_null(matched["removed"], False)).to_pylist())

