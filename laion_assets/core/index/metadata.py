"""The metadata of an index's rows: one Arrow IPC file, row-aligned with the index (row i describes vector i), read
memory-mapped so that a service over billions of rows only pages in the rows it returns."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from laion_assets.core.storage import atomic_path

# What every index row carries (LAION's column names where it has one); `tar` (the storage key of the webdataset
# shard holding the image) and `indice` (the crawl of a merged index's row) are added when known; `sha256` and
# `phash` (of the image) let the service match a removal list newer than the index against its rows; `aesthetic`
# (the LAION-Aesthetics score) lets it filter on min_aesthetic.
COLUMNS: dict[str, pa.DataType] = {
    "URL": pa.string(), "caption": pa.string(), "key": pa.string(), "shard": pa.string(), "WIDTH": pa.int64(),
    "HEIGHT": pa.int64(), "similarity": pa.float64(), "punsafe": pa.float64(), "pwatermark": pa.float64(),
    "LANGUAGE": pa.string(),
}
OPTIONAL: dict[str, pa.DataType] = {"tar": pa.string(), "indice": pa.string(), "sha256": pa.string(),
                                     "phash": pa.string(), "aesthetic": pa.float64()}
BATCH_ROWS = 65_536


class MetadataError(ValueError):
    """Index metadata that lacks a column, has the wrong type, or is not row-aligned with the embeddings."""


def conform(table: pa.Table) -> pa.Table:
    """The caller's table with exactly our columns (cast to our types), or MetadataError naming what is missing."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise MetadataError(f"index metadata lacks column(s) {missing} (has {table.column_names})")
    wanted = {**COLUMNS, **{c: t for c, t in OPTIONAL.items() if c in table.column_names}}
    try:
        return pa.table({c: table[c].cast(t) for c, t in wanted.items()})
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise MetadataError(f"index metadata has a column of the wrong type: {err}") from err


def empty() -> pa.Table:
    return pa.schema(list(COLUMNS.items())).empty_table()


def complete(table: pa.Table) -> pa.Table:
    """A conformed table with every optional column too (nulls where unknown): one schema for merged parts."""
    table = conform(table)
    extra = {n: table[n] if n in table.column_names else pa.nulls(table.num_rows, t) for n, t in OPTIONAL.items()}
    return pa.table({**{n: table[n] for n in COLUMNS}, **extra})


def write_arrow(batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema, path: str) -> int:
    """Write record batches to an Arrow IPC file atomically (temporary name, then rename); returns the row count."""
    rows = 0
    with atomic_path(path) as tmp, pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            for b in (batch.to_batches(BATCH_ROWS) if isinstance(batch, pa.Table) else [batch]):
                writer.write_batch(b)
                rows += b.num_rows
    return rows


def open_arrow(path: str) -> pa.Table:
    """The metadata file, memory-mapped: taking rows reads only their pages."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


class RowReader:
    """Rows of a (memory-mapped) table by position, as dicts: what the service returns for a query's hits.

    Looked up record batch by record batch, with the batches and their first rows listed once: `Table.take` over
    the file's chunked columns costs tens of milliseconds at a million rows whatever the number of ids (it gathers
    across every chunk), which was most of a /knn-service request. A few ids are zero-copy one-row slices of their
    batches, many ids one take per batch."""

    SLICES = 64  # up to this many ids, one slice each; beyond, one take per batch

    def __init__(self, table: pa.Table) -> None:
        self.schema = table.schema
        self.batches = table.to_batches()
        self.starts = [0]
        for b in self.batches:
            self.starts.append(self.starts[-1] + b.num_rows)

    def rows(self, ids: list[int], columns: list[str] | None = None) -> list[dict]:
        """The rows at ids (in that order; IndexError for one out of range)."""
        if not ids:
            return []
        n = self.starts[-1]
        if len(ids) <= self.SLICES:
            pieces = []
            for i in ids:
                if not 0 <= i < n:
                    raise IndexError(f"row id {i} out of range 0..{n - 1}")
                b = bisect.bisect_right(self.starts, i) - 1
                pieces.append(self.batches[b].slice(i - self.starts[b], 1))
            found = pa.Table.from_batches(pieces, self.schema)
            return (found.select(columns) if columns else found).to_pylist()
        wanted = np.asarray(ids, np.int64)
        if wanted.min() < 0 or wanted.max() >= n:
            raise IndexError(f"row ids out of range 0..{n - 1}")
        starts = np.asarray(self.starts)
        which = np.searchsorted(starts, wanted, side="right") - 1
        order = np.argsort(which, kind="stable")
        pieces = []
        for group in np.split(order, np.flatnonzero(np.diff(which[order])) + 1):
            b = int(which[group[0]])
            batch = self.batches[b].select(columns) if columns else self.batches[b]
            pieces.append(batch.take(pa.array(wanted[group] - starts[b])))
        out: list[dict] = [{}] * len(ids)
        for position, row in zip(order.tolist(), pa.Table.from_batches(pieces).to_pylist(), strict=True):
            out[position] = row
        return out
