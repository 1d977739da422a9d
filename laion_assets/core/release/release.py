"""The release of a crawl: its filtered metadata split into en / multi / nolang parts (zstd Parquet, at most
`rows_per_part` rows each), and `_manifest.json` written last.

A rebuild first deletes the manifest (so that no reader trusts a half-rewritten release), writes every part,
removes the parts of the previous release that the new one does not have, then writes the manifest. Rows keep the
order of their buckets and keys, so the same inputs give the same bytes. Exact duplicates are dropped by default,
near duplicates only marked (`ReleaseSettings`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core import paths
from laion_assets.core.records import JsonRecord
from laion_assets.core.release.columns import FILTERED_SCHEMA, SUBSETS
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.settings import ReleaseSettings
from laion_assets.core.storage import Storage


@dataclass
class ReleasePart(JsonRecord):
    subset: str
    file: str  # relative to the release folder
    rows: int
    bytes: int
    sha256: str


@dataclass
class ReleaseManifest(JsonRecord):
    """A finished release: written last, after every part it names."""

    crawl: str
    counts: dict[str, int]
    parts: list[ReleasePart]
    removed: dict[str, int]
    removal_version: str
    dropped: dict[str, int]
    duplicates: dict[str, int]
    models: dict[str, Any]
    settings: dict[str, Any]
    code_version: str
    created: str
    buckets: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def part_keys(self, subset: str | None = None) -> list[str]:
        root = paths.release(self.crawl)
        return [paths.join(root, p.file) for p in self.parts if subset is None or p.subset == subset]


class IncompleteReleaseError(ValueError):
    """Buckets of the crawl have no filtered metadata yet."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kept_rows(settings: ReleaseSettings) -> Any:
    import pyarrow.compute as pc

    keep = pc.scalar(True)
    if settings.drop_exact_duplicates:
        keep = keep & pc.field("duplicate_of").is_null()
    if settings.drop_near_duplicates:
        keep = keep & pc.field("near_duplicate_of").is_null()
    return keep


def write_release(store: Storage, crawl: str, buckets: Mapping[str, FilteredBucket], expected: list[str],
                  settings: ReleaseSettings, models: dict[str, Any], code_version: str) -> ReleaseManifest:
    """Write the crawl's release from every bucket's filtered metadata; returns the manifest (already stored)."""
    import pyarrow.dataset as ds

    missing = sorted(set(expected) - set(buckets))
    if missing:
        raise IncompleteReleaseError(f"{crawl}: filtered_metadata of bucket(s) {', '.join(missing)} missing; "
                                     "nothing written")
    if settings.rows_per_part < 1:
        raise ValueError(f"rows_per_part must be at least 1, not {settings.rows_per_part}")
    ordered = [buckets[b] for b in sorted(buckets)]
    root = paths.release(crawl)
    old = set(store.list(root))
    store.delete(paths.release_manifest(crawl))
    parts: list[ReleasePart] = []
    counts = dict.fromkeys(SUBSETS, 0)
    keep = _kept_rows(settings)
    with store.local_copies([b.file for b in ordered]) as local:
        dataset = ds.dataset(local, format="parquet", schema=FILTERED_SCHEMA)
        total = dataset.count_rows()
        exact_dropped = dataset.count_rows(filter=ds.field("duplicate_of").is_valid()) \
            if settings.drop_exact_duplicates else 0
        for subset in SUBSETS:
            rows = dataset.scanner(filter=keep & (ds.field("subset") == subset), batch_size=65_536).to_batches()
            parts += _write_parts(store, crawl, subset, rows, settings.rows_per_part)
            counts[subset] = sum(p.rows for p in parts if p.subset == subset)
    for key in sorted(old - {paths.join(root, p.file) for p in parts}):
        if key.endswith(".parquet") and "/part-" in key:
            store.delete(key)
    released = sum(counts.values())
    exact = sum(b.exact_duplicates for b in ordered)
    near = sum(b.near_duplicates for b in ordered)
    removed: dict[str, int] = {}
    for b in ordered:
        for reason, n in b.removed.items():
            removed[reason] = removed.get(reason, 0) + n
    manifest = ReleaseManifest(
        crawl=crawl, counts=counts, parts=parts, removed=removed,
        removal_version=max((b.removal_version for b in ordered), default=""),
        dropped={"exact_duplicates": exact_dropped, "near_duplicates": total - released - exact_dropped},
        duplicates={"exact": exact, "near": near},
        models=models, settings=settings_dict(settings), code_version=code_version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), buckets=sorted(buckets))
    store.write_bytes(paths.release_manifest(crawl), manifest.to_json())
    return manifest


def _write_parts(store: Storage, crawl: str, subset: str, batches: Any, rows_per_part: int) -> list[ReleasePart]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: list[ReleasePart] = []
    with store.staging_dir() as stage:
        writer, rows, local = None, 0, ""

        def close() -> None:
            nonlocal writer
            if writer is None:
                return
            writer.close()
            writer = None
            name = paths.release_part_name(subset, len(parts))
            parts.append(ReleasePart(subset, name, rows, os.path.getsize(local), _sha256(local)))
            store.put_file(local, paths.join(paths.release(crawl), name))

        for batch in batches:
            offset = 0
            while offset < batch.num_rows:
                if writer is None:
                    local = os.path.join(stage, f"{subset}-{len(parts)}.parquet")
                    writer, rows = pq.ParquetWriter(local, FILTERED_SCHEMA, compression="zstd"), 0
                take = min(batch.num_rows - offset, rows_per_part - rows)
                writer.write_table(pa.Table.from_batches([batch.slice(offset, take)], FILTERED_SCHEMA))
                rows += take
                offset += take
                if rows == rows_per_part:
                    close()
        close()
    return parts


def settings_dict(settings: ReleaseSettings) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(settings)


def release_summary(manifest: ReleaseManifest) -> dict[str, Any]:
    return {"rows": manifest.rows, **{f"rows_{s}": manifest.counts.get(s, 0) for s in SUBSETS},
            "parts": len(manifest.parts), "bytes": sum(p.bytes for p in manifest.parts),
            "removed": sum(manifest.removed.values()), "removal_version": manifest.removal_version}



@dataclass
class RowAccount:
    """The release's rows counted from its stored parts, against what the filtered metadata says it must hold."""

    released: int
    filtered: int
    removed: int
    dropped_duplicates: int

    @property
    def expected(self) -> int:
        return self.filtered - self.dropped_duplicates

    @property
    def holds(self) -> bool:
        return self.released == self.expected

    def describe(self) -> str:
        return (f"{self.released} rows in the parts; the filtered metadata has {self.filtered} rows (after "
                f"{self.removed} removed) less {self.dropped_duplicates} dropped duplicates = {self.expected}")


def account_rows(store: Storage, manifest: ReleaseManifest, buckets: Mapping[str, FilteredBucket],
                 settings: ReleaseSettings) -> RowAccount:
    """Count the parts' rows as stored (Parquet footers, not the manifest's counts) and the rows the release must
    have: every filtered row (the filtered metadata already lacks removed samples) less the duplicates the settings
    drop, counted from the filtered files' own duplicate columns."""
    import pyarrow.compute as pc

    released = sum(store.parquet_rows(k) for k in manifest.part_keys())
    filtered = dropped = 0
    for record in buckets.values():
        table = store.read_parquet(record.file, columns=["duplicate_of", "near_duplicate_of"])
        drop = pc.is_valid(table["duplicate_of"]) if settings.drop_exact_duplicates else None
        if settings.drop_near_duplicates:
            near = pc.is_valid(table["near_duplicate_of"])
            drop = near if drop is None else pc.or_(drop, near)
        filtered += table.num_rows
        dropped += int(pc.sum(drop).as_py() or 0) if drop is not None else 0
    removed = sum(sum(b.removed.values()) for b in buckets.values())
    return RowAccount(released, filtered, removed, dropped)
