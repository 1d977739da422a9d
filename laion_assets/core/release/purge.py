"""Purge: the images a removal list names taken out of the webdataset shards themselves, not only out of the
metadata, so that they are gone from storage.

For every shard of a finished download, the samples to drop are the successful rows the list matches (and rows a
killed purge already marked). The shard's tar is rewritten without their members, every other member copied byte
for byte with its header (same names, order and layout), and committed atomically; then its Parquet rows are marked
`status = "removed"` with the reason in `error_message`, its `_stats.json` and the download's `_manifest.json`
count them under `removed` instead of `success`. Each file is replaced atomically and a rerun finishes what a killed
one left, so the shards are never half-purged for a reader. A download redone from scratch (its settings changed)
fetches the URLs again: `filtered_metadata` still keeps them out of the release, and a purge after it removes them
again.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core import paths
from laion_assets.core.download.plan import ShardsManifest, read_manifest
from laion_assets.core.download.report import ShardStats
from laion_assets.core.release.removals import RemovalList
from laion_assets.core.storage import Storage

REMOVED = "removed"


@dataclass
class PurgeReport:
    shards: int = 0
    shards_rewritten: int = 0
    samples_removed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, other: PurgeReport) -> None:
        self.shards += other.shards
        self.shards_rewritten += other.shards_rewritten
        self.samples_removed += other.samples_removed
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n


def _rewrite_tar(store: Storage, key: str, drop: set[str]) -> int:
    """Copy the tar without the members of the dropped sample keys; returns how many members were left out."""
    left_out = 0
    with store.local_copies([key]) as (local,), store.staging_dir() as stage:
        out = os.path.join(stage, "shard.tar")
        with tarfile.open(local, "r:") as src, tarfile.open(out, "w:", format=src.format) as dst:
            for member in src:
                sample = member.name.split("/")[-1].split(".", 1)[0]
                if sample in drop:
                    left_out += 1
                    continue
                data = src.extractfile(member) if member.isfile() else None
                dst.addfile(member, data)
        if left_out:
            store.put_file(out, key)
    return left_out


def purge_download(store: Storage, prefix: str, removal_list: RemovalList) -> PurgeReport:
    """Purge one finished download (a crawl x bucket's image_shards)."""
    import polars as pl

    manifest: ShardsManifest = read_manifest(store, prefix)
    report = PurgeReport(shards=len(manifest.shards))
    changed = False
    for entry, keys in zip(manifest.shards, manifest.keys(), strict=True):
        rows = pl.from_arrow(store.read_parquet(keys.rows))
        assert isinstance(rows, pl.DataFrame)
        reasons = removal_list.reasons(rows.select("url", "sha256", "phash"))
        rows = rows.with_columns(reasons.alias("_reason"))
        newly = rows.filter((pl.col("status") == "success") & pl.col("_reason").is_not_null())
        already = rows.filter(pl.col("status") == REMOVED)
        drop = set(newly["key"].to_list()) | set(already["key"].to_list())
        if not drop:
            continue
        if _rewrite_tar(store, keys.tar, drop):
            report.shards_rewritten += 1
        if newly.height:
            marked = rows.with_columns(
                pl.when(pl.col("key").is_in(newly["key"].implode())).then(pl.lit(REMOVED))
                .otherwise(pl.col("status")).alias("status"),
                pl.when(pl.col("key").is_in(newly["key"].implode())).then(pl.col("_reason"))
                .otherwise(pl.col("error_message")).alias("error_message")).drop("_reason")
            schema = store.read_parquet(keys.rows).schema
            store.write_parquet(keys.rows, marked.to_arrow().cast(schema))
            stats = ShardStats.from_json(store.read_bytes(keys.stats))
            stats.statuses["success"] = stats.statuses.get("success", 0) - newly.height
            stats.statuses[REMOVED] = stats.statuses.get(REMOVED, 0) + newly.height
            store.write_bytes(keys.stats, stats.to_json())
            entry.successes -= newly.height
            manifest.statuses["success"] = manifest.statuses.get("success", 0) - newly.height
            manifest.statuses[REMOVED] = manifest.statuses.get(REMOVED, 0) + newly.height
            changed = True
            report.samples_removed += newly.height
            for reason, n in newly.group_by("_reason").len().iter_rows():
                report.by_reason[reason] = report.by_reason.get(reason, 0) + int(n)
    if changed:
        store.write_bytes(paths.shards_manifest(prefix), manifest.to_json())
    return report


def purge_crawl(store: Storage, crawl: str, removal_list: RemovalList) -> PurgeReport:
    """Purge every finished download of a crawl (each bucket, whatever the bucket count it was made with)."""
    report = PurgeReport()
    for key in store.list(paths.crawl_root(crawl)):
        if "/images/" in key and key.endswith("/" + paths.SHARDS_MANIFEST):
            report.add(purge_download(store, key.rsplit("/", 1)[0], removal_list))
    return report


def report_line(crawl: str, report: PurgeReport) -> str:
    reasons: Any = ", ".join(f"{r} {n}" for r, n in sorted(report.by_reason.items())) or "none"
    return (f"{crawl}: {report.samples_removed} samples purged from {report.shards_rewritten} of {report.shards} "
            f"shards (by reason: {reasons})")
