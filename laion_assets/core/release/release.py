"""The release of a crawl: its filtered metadata split into en / multi / nolang parts (zstd Parquet, at most
`rows_per_part` rows each), and `_manifest.json` written last.

A rebuild first deletes the manifest (so that no reader trusts a half-rewritten release), writes every part,
removes the parts of the previous release that the new one does not have, then writes the manifest. Rows keep the
order of their buckets and keys, so the same inputs give the same bytes. Exact duplicates are dropped by default,
near and semantic duplicates only marked (`ReleaseSettings`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core import paths
from laion_assets.core.records import JsonRecord
from laion_assets.core.release.columns import FILTERED_SCHEMA, PARQUET_OPTIONS, SUBSETS
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.settings import ReleaseSettings
from laion_assets.core.storage import Storage, file_sha256

# Rows per read batch and per row group of a part.
BATCH_ROWS = 65_536


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

    def committed_at(self) -> str:
        return paths.release_manifest(self.crawl)

    def part_keys(self, subset: str | None = None) -> list[str]:
        root = paths.release(self.crawl)
        return [paths.join(root, p.file) for p in self.parts if subset is None or p.subset == subset]


class IncompleteReleaseError(ValueError):
    """Buckets of the crawl have no filtered metadata yet."""



DUPLICATE_COLUMNS = (("exact_duplicates", "duplicate_of"), ("near_duplicates", "near_duplicate_of"),
                     ("semantic_duplicates", "semantic_duplicate_of"))


def dropped_columns(settings: ReleaseSettings) -> list[tuple[str, str]]:
    """(name, column) of the duplicate marks whose rows the release leaves out, in the order they are counted."""
    drops = (settings.drop_exact_duplicates, settings.drop_near_duplicates, settings.drop_semantic_duplicates)
    return [pair for pair, drop in zip(DUPLICATE_COLUMNS, drops, strict=True) if drop]


def _kept_mask(batch: Any, settings: ReleaseSettings) -> Any:
    """Which rows of a table of filtered metadata the release keeps (exact, and optionally near and semantic,
    duplicates out); None when it keeps them all."""
    import pyarrow.compute as pc

    keep = None
    for _, column in dropped_columns(settings):
        null = pc.is_null(batch.column(column))
        keep = null if keep is None else pc.and_(keep, null)
    return keep


def _dropped_by_kind(table: Any, settings: ReleaseSettings) -> dict[str, int]:
    """The rows each dropped kind leaves out, a row counted under the first kind that marks it."""
    import pyarrow.compute as pc

    out, taken = {}, None
    for name, column in dropped_columns(settings):
        marked = pc.is_valid(table.column(column))
        fresh = marked if taken is None else pc.and_(marked, pc.invert(taken))
        out[name] = int(pc.sum(fresh).as_py() or 0)
        taken = marked if taken is None else pc.or_(taken, marked)
    return out


def with_semantic_column(table: Any) -> Any:
    """Filtered metadata written before the semantic dedup existed: its column, null."""
    import pyarrow as pa

    if "semantic_duplicate_of" in table.column_names:
        return table
    return table.append_column("semantic_duplicate_of", pa.nulls(table.num_rows, pa.string()))


def release_schema(schemas: list[Any]) -> Any:
    """FILTERED_SCHEMA, then the columns the buckets' files add (a URL list's own, such as DataComp's `uid`), in the
    order they first appear: every part of a release has the same columns."""
    import pyarrow as pa

    fields = list(FILTERED_SCHEMA)
    for schema in schemas:
        fields += [f for f in schema if f.name not in {g.name for g in fields}]
    return pa.schema(fields)


def run(store: Storage, crawl: str, buckets: Mapping[str, FilteredBucket], expected: list[str],
        settings: ReleaseSettings, models: dict[str, Any], code_version: str) -> ReleaseManifest:
    """The release's entry point: the crawl's release written from every bucket's filtered metadata; returns the
    manifest (committed last, its completion marker)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

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
    dropped = {name: 0 for name, _ in DUPLICATE_COLUMNS}
    # One pass over the buckets' files, in bucket order, each bucket split among the three subsets' writers: the
    # rows of each subset keep their bucket and key order, and every file is read once (not once per subset).
    with store.local_copies([b.file for b in ordered]) as local, store.staging_dir() as stage:
        schema = release_schema([pq.read_schema(path) for path in local])
        writers = {subset: _PartWriter(store, crawl, subset, stage, settings.rows_per_part, schema)
                   for subset in SUBSETS}
        for path in local:
            # A whole bucket at once (what its join held anyway): twice as fast as reading it in batches.
            table = with_semantic_column(pq.read_table(path))
            missing = set(FILTERED_SCHEMA.names) - set(table.column_names)
            if missing:
                raise ValueError(f"{path}: not filtered metadata, columns {sorted(missing)} missing")
            for name in set(schema.names) - set(table.column_names):  # an added column another bucket has
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
            table = table.select(schema.names)
            if table.schema != schema:
                table = table.cast(schema)
            for name, n in _dropped_by_kind(table, settings).items():
                dropped[name] += n
            mask = _kept_mask(table, settings)
            # One filter per subset, the duplicates' mask folded in: each row's strings are copied once.
            for subset, writer in writers.items():
                rows = pc.equal(table.column("subset"), subset)
                writer.write(table.filter(rows if mask is None else pc.and_(rows, mask)))
        for subset, writer in writers.items():
            writer.close()
            parts += writer.parts
            counts[subset] = sum(p.rows for p in writer.parts)
    for key in sorted(old - {paths.join(root, p.file) for p in parts}):
        if paths.is_release_part(key):
            store.delete(key)
    exact = sum(b.exact_duplicates for b in ordered)
    near = sum(b.near_duplicates for b in ordered)
    semantic = sum(b.semantic_duplicates for b in ordered)
    removed: dict[str, int] = {}
    for b in ordered:
        for reason, n in b.removed.items():
            removed[reason] = removed.get(reason, 0) + n
    manifest = ReleaseManifest(
        crawl=crawl, counts=counts, parts=parts, removed=removed,
        removal_version=max((b.removal_version for b in ordered), default=""),
        dropped=dropped, duplicates={"exact": exact, "near": near, "semantic": semantic},
        models=models, settings=settings_dict(settings), code_version=code_version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), buckets=sorted(buckets))
    store.write_bytes(paths.release_manifest(crawl), manifest.to_json())
    return manifest


class _PartWriter:
    """One subset's parts: rows buffered into row groups of BATCH_ROWS, a new part every `rows_per_part` rows, each
    part committed (with its size and sha256) as soon as it is full."""

    def __init__(self, store: Storage, crawl: str, subset: str, stage: str, rows_per_part: int, schema: Any) -> None:
        self.store, self.crawl, self.subset, self.stage, self.rows_per_part = store, crawl, subset, stage, rows_per_part
        self.schema = schema
        self.parts: list[ReleasePart] = []
        self.pending: list[Any] = []  # tables not yet written, fewer than BATCH_ROWS rows in all
        self.pending_rows = 0
        self.writer: Any = None
        self.rows = 0  # rows in the open part
        self.local = ""

    def write(self, table: Any) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        # A row group is written once BATCH_ROWS rows are pending, or enough to fill the open part.
        while self.pending_rows and self.pending_rows >= min(BATCH_ROWS, self.rows_per_part - self.rows):
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending_rows:
            return
        if self.writer is None:
            self.local = os.path.join(self.stage, f"{self.subset}-{len(self.parts)}.parquet")
            self.writer, self.rows = pq.ParquetWriter(self.local, self.schema, **PARQUET_OPTIONS), 0
        table = pa.concat_tables(self.pending)
        take = min(table.num_rows, BATCH_ROWS, self.rows_per_part - self.rows)
        self.writer.write_table(table.slice(0, take), row_group_size=take)
        rest = table.slice(take)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.rows += take
        if self.rows == self.rows_per_part:
            self._commit()

    def _commit(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        name = paths.release_part_name(self.subset, len(self.parts))
        self.parts.append(ReleasePart(self.subset, name, self.rows, os.path.getsize(self.local),
                                      file_sha256(self.local)))
        self.store.put_file(self.local, paths.join(paths.release(self.crawl), name))
        self.rows = 0

    def close(self) -> None:
        while self.pending_rows:
            self._flush()
        self._commit()


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
    released = sum(store.parquet_rows(k) for k in manifest.part_keys())
    filtered = dropped = 0
    for record in buckets.values():
        try:
            table = store.read_parquet(record.file, columns=[c for _, c in DUPLICATE_COLUMNS])
        except (KeyError, ValueError):  # written before the semantic dedup existed
            old = store.read_parquet(record.file, columns=[c for _, c in DUPLICATE_COLUMNS[:2]])
            table = with_semantic_column(old)
        filtered += table.num_rows
        dropped += sum(_dropped_by_kind(table, settings).values())
    removed = sum(sum(b.removed.values()) for b in buckets.values())
    return RowAccount(released, filtered, removed, dropped)
