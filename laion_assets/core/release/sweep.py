"""The neighbour sweep: from the samples a removal list version removed to the indexed samples near them, as
candidate rows for review (the Stanford Internet Observatory grew 27 confirmed hash matches into 2,773 candidates
with kNN queries around each), so that a report reaches its near neighbours without anyone looking at an image.

A removed sample is gone from the release and, once rebuilt, from the index: its vector is read from its crawl's
embeddings (which keep every embedded sample), found by matching the version's entries against the embeddings'
URLs and the download's sha256 and pHash of each sample. Each such vector queries every crawl's kNN index; hits at
or above the similarity that the removal list (its latest version) does not already remove are the candidates: one
row per candidate and removed sample it neighbours (ids, URLs, sha256, pHash, similarity), never image bytes. Given
a reason, the candidates become the next removal version (sha256 entries).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import embedding_model, read_image_embeddings
from laion_assets.core.download.plan import read_manifest
from laion_assets.core.index.neighbours import check_model, indexed_crawls, neighbours, open_crawl_indices
from laion_assets.core.paths import Layout
from laion_assets.core.progress import Log
from laion_assets.core.records import JsonRecord
from laion_assets.core.release import removals as rl
from laion_assets.core.release.decontaminate import new_entries
from laion_assets.core.settings import SweepSettings
from laion_assets.core.storage import Storage

CANDIDATE_SCHEMA = {"crawl": pl.String, "id": pl.Int64, "key": pl.String, "URL": pl.String, "sha256": pl.String,
                    "phash": pl.String, "similarity": pl.Float64, "removed_crawl": pl.String,
                    "removed_key": pl.String, "removed_url": pl.String, "removed_sha256": pl.String,
                    "removed_rule": pl.String}


class NothingToSweep(ValueError):
    """The removal list (or the version asked for) has no entries."""


@dataclass
class RemovedSamples:
    """The embedded samples a version removed: where they are, what removed them, and their image vectors."""

    crawl: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    url: list[str | None] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    rule: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    def stacked(self) -> np.ndarray:
        return np.concatenate(self.vectors).astype(np.float32) if self.vectors else np.zeros((0, 0), np.float32)


def _crawls_with_embeddings(store: Storage, layout: Layout) -> list[str]:
    suffix = f"/embeddings/buckets={layout.buckets}/"
    return sorted({k.split("/")[1] for k in store.list("crawls") if suffix in k})


def _download_rows(store: Storage, crawl: str, bucket: str, layout: Layout) -> pl.DataFrame:
    """The bucket's download rows (key, sha256, phash); none when the download's manifest is not there."""
    from laion_assets.core.download.plan import IncompleteDownloadError

    empty = pl.DataFrame(schema={"key": pl.String, "sha256": pl.String, "phash": pl.String})
    try:
        manifest = read_manifest(store, paths.image_shards(crawl, bucket, layout))
    except IncompleteDownloadError:
        return empty
    parts = [pl.from_arrow(store.read_parquet(k.rows, columns=["key", "sha256", "phash"])) for k in manifest.keys()]
    frames = [p for p in parts if isinstance(p, pl.DataFrame)]
    return pl.concat(frames).unique("key", keep="first", maintain_order=True) if frames else empty


def removed_samples(store: Storage, crawls: list[str], layout: Layout, version_list: rl.RemovalList,
                    log: Log | None = None) -> RemovedSamples:
    """Every embedded sample of the crawls that the version's entries match, with its image vector."""
    out = RemovedSamples()
    # URL, domain and md5 entries match the embeddings' own URLs: the download's rows are read only for hashes.
    hashes = any(e.kind in ("sha256", "phash") for e in version_list.entries)
    no_rows = pl.DataFrame(schema={"key": pl.String, "sha256": pl.String, "phash": pl.String})
    for crawl in crawls:
        for bucket in layout.bucket_keys():
            files = paths.bucket_embeddings(crawl, bucket, layout)
            if not store.exists(files.metadata):
                continue
            meta = pl.from_arrow(store.read_parquet(files.metadata, columns=["key", "url"]))
            assert isinstance(meta, pl.DataFrame)
            downloaded = _download_rows(store, crawl, bucket, layout) if hashes else no_rows
            rows = meta.with_row_index("row").join(downloaded, on="key", how="left", maintain_order="left")
            rules = version_list.match(rows.select("url", "sha256", "phash").to_arrow(), url="url")["rule"]
            hit = rows.with_columns(pl.Series("rule", rules.to_pylist(), pl.String)).filter(
                pl.col("rule").is_not_null())
            if not hit.height:
                continue
            img, full_meta = read_image_embeddings(store, files)
            out.models.add(embedding_model(full_meta))
            out.vectors.append(np.asarray(img[hit["row"].to_numpy()], np.float32))
            out.crawl += [crawl] * hit.height
            out.key += hit["key"].to_list()
            out.url += hit["url"].to_list()
            out.sha256 += hit["sha256"].to_list()
            out.rule += hit["rule"].to_list()
            if log:
                log(f"{crawl} bucket {bucket}: {hit.height} removed samples")
    return out


@dataclass
class SweepReport(JsonRecord):
    """What a sweep found: the version swept and its entries, the removed samples found in the embeddings (and the
    entries that matched none), the crawls searched, the candidates (rows and distinct samples) and, when they were
    added, the new removal version."""

    version: str
    entries: int = 0
    removed_samples: int = 0
    entries_without_samples: int = 0
    crawls: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    candidate_rows: int = 0
    candidates: int = 0
    min_similarity: float = 0.0
    entries_added: int = 0
    already_listed: int = 0
    added_version: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        added = (f"; {self.entries_added} entries added as {self.added_version}" if self.added_version
                 else "")
        return (f"removal list {self.version}: {self.entries} entries, {self.removed_samples} removed samples "
                f"embedded ({self.entries_without_samples} entries matched none); {self.candidates} candidates "
                f"({self.candidate_rows} rows) at similarity >= {self.min_similarity} in {len(self.crawls)} "
                f"indices{added}")

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int | float | str)}


def run(store: Storage, layout: Layout, settings: SweepSettings, version: int | None = None,
        crawls: list[str] | None = None, add_reason: str = "", log: Log | None = None
        ) -> tuple[SweepReport, pl.DataFrame]:
    """The sweep's entry point: the candidates around the samples removal list `version` (default: the latest)
    added, in the kNN indices of `crawls` (default: every indexed crawl), and, given `add_reason`, the next removal
    version made of them. NothingToSweep for an empty list or version; KeyError for a version that is not there;
    EmbeddingModelMismatch when the embeddings are not of an index's model."""
    start = time.perf_counter()
    version_list = rl.added_in(store, version)
    if not len(version_list):
        raise NothingToSweep("the removal list is empty: nothing to sweep" if version_list.version == rl.NO_VERSION
                             else f"removal list {version_list.version} has no entries: nothing to sweep")
    report = SweepReport(version_list.version, len(version_list), min_similarity=settings.min_similarity)
    searched = indexed_crawls(store, crawls)
    sources = sorted(set(_crawls_with_embeddings(store, layout)) | set(crawls or []))
    removed = removed_samples(store, sources, layout, version_list, log)
    report.removed_samples = len(removed.key)
    report.entries_without_samples = len({e.rule for e in version_list.entries} - set(removed.rule))
    vectors = removed.stacked()
    found = []
    with open_crawl_indices(store, searched) as opened:
        report.crawls, report.unavailable = sorted(opened.indices), opened.unavailable
        model = removed.models.pop() if len(removed.models) == 1 else ""
        for crawl, index in opened.indices.items():
            if not len(vectors):
                break
            check_model(index, model, int(vectors.shape[1]))
            hits = neighbours(index, vectors, settings.neighbours, settings.min_similarity)
            q = hits["query"].to_numpy()
            found.append(hits.select(
                pl.lit(crawl, pl.String).alias("crawl"), "id",
                *(pl.col(c) if c in hits.columns else pl.lit(None, pl.String).alias(c)
                  for c in ("key", "URL", "sha256", "phash")), "similarity",
                pl.Series("removed_crawl", [removed.crawl[i] for i in q], pl.String),
                pl.Series("removed_key", [removed.key[i] for i in q], pl.String),
                pl.Series("removed_url", [removed.url[i] for i in q], pl.String),
                pl.Series("removed_sha256", [removed.sha256[i] for i in q], pl.String),
                pl.Series("removed_rule", [removed.rule[i] for i in q], pl.String)))
    rows = pl.concat([f.cast(CANDIDATE_SCHEMA) for f in found]) if found else pl.DataFrame(schema=CANDIDATE_SCHEMA)
    # What the list removes already (the removed samples themselves among them) is no candidate.
    current = rl.load(store)
    listed = current.match(rows.select("URL", "sha256", "phash").to_arrow())["removed"].to_pylist()
    rows = rows.filter(~pl.Series(listed, dtype=pl.Boolean)).sort(["similarity", "crawl", "id"],
                                                                   descending=[True, False, False],
                                                                   maintain_order=True)
    report.candidate_rows = rows.height
    distinct = rows.unique(["crawl", "id"], keep="first", maintain_order=True)
    report.candidates = distinct.height
    if add_reason:
        entries, report.already_listed = new_entries(current, distinct, add_reason)
        report.entries_added = len(entries)
        if entries:
            report.added_version = rl.add(store, entries)
    report.seconds = time.perf_counter() - start
    return report, rows
