"""Searching a built index folder: faiss indices read memory-mapped (on-disk inverted lists for a merged index),
metadata memory-mapped, removals newer than the index filtered out at query time, and clip-retrieval's post
filters (dedup by embedding, safety by punsafe)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.index import metadata as meta
from laion_assets.core.storage import atomic_path

MODALITIES = ("image", "text")


@contextlib.contextmanager
def faiss_quiet() -> Iterator[None]:
    """faiss reports work on on-disk inverted lists ("IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ...",
    "resizing ...") with C printf, past Python's sys.stdout: this sends the process's stdout to /dev/null around such
    a call, C's buffer flushed before it comes back. (The whole process's: for the short calls that load or merge an
    index, never around a query.)"""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def load_faiss(index_path: str, infos_path: str | None = None) -> Any:
    """A faiss index read without loading its vectors (memory-mapped; a merged index's inverted lists stay in their
    .ivfdata file), with the search parameters autofaiss tuned (recorded in its infos) applied."""
    import faiss

    if os.path.exists(paths.ivfdata_of(index_path)):
        with faiss_quiet():
            index = faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR)
    else:
        index = faiss.read_index(index_path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if infos_path and os.path.exists(infos_path):
        with open(infos_path) as f:
            params = json.load(f).get("index_param")
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
    return index


@dataclass
class Hit:
    id: int
    similarity: float
    row: dict[str, Any]


@dataclass
class OpenIndex:
    """One indice of the service: its two faiss indices and the metadata, all memory-mapped."""

    name: str
    folder: str
    image: Any
    text: Any
    metadata: pa.Table
    report: dict[str, Any] = field(default_factory=dict)
    removed: frozenset[int] = frozenset()  # row ids removed after the build (keys repeat across buckets)

    @property
    def dim(self) -> int:
        return int(self.image.d)

    def faiss(self, modality: str) -> Any:
        return self.image if modality == "image" else self.text

    @cached_property
    def on_disk(self) -> bool:
        """Whether a search may read inverted lists from disk (a merged index's .ivfdata): it then waits on I/O,
        which its CPU time does not show."""
        return any(os.path.exists(paths.index_files(self.folder).ivfdata(m)) for m in MODALITIES)

    @cached_property
    def rows(self) -> meta.RowReader:
        """The metadata's rows by index id (its record batches listed once, for every query)."""
        return meta.RowReader(self.metadata)


class IndexUnavailable(RuntimeError):
    """An index folder that cannot be served (missing or corrupt files); the message says why."""


def open_index(name: str, folder: str) -> OpenIndex:
    """An index folder, checked: complete (report present), both indices readable and row-aligned with the
    metadata. Anything else is IndexUnavailable with the reason."""
    files = paths.index_files(folder)
    if not os.path.exists(files.report):
        raise IndexUnavailable(f"{files.report} is missing: the index was not built completely")
    try:
        with open(files.report) as f:
            report = json.load(f)
        image = load_faiss(files.image, files.image_infos)
        text = load_faiss(files.text, files.text_infos)
        table = meta.open_arrow(files.metadata)
    except Exception as err:  # faiss raises RuntimeError, Arrow ArrowInvalid, json ValueError: all mean "corrupt"
        raise IndexUnavailable(f"cannot read the index in {folder}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not image.ntotal == text.ntotal == table.num_rows:
        raise IndexUnavailable(f"index {folder} is not row-aligned: {image.ntotal} image vectors, {text.ntotal} text "
                               f"vectors, {table.num_rows} metadata rows")
    return OpenIndex(name, folder, image, text, table, report, read_removed(folder))


def _dedup(embeddings: np.ndarray, threshold: float) -> set[int]:
    """Positions of results that repeat an earlier (better ranked) one: inner product above threshold."""
    drop: set[int] = set()
    if len(embeddings) < 2:
        return drop
    sims = embeddings @ embeddings.T
    for i in range(len(embeddings)):
        if i in drop:
            continue
        later = np.nonzero(sims[i, i + 1 :] > threshold)[0] + i + 1
        drop.update(int(j) for j in later)
    return drop


@dataclass(frozen=True)
class RowFilter:
    """Metadata conditions a result must meet (None or 0: no condition)."""

    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    language: str = ""
    min_width: int = 0
    min_height: int = 0
    min_aesthetic: float | None = None  # a row without an aesthetic score does not pass it

    @property
    def empty(self) -> bool:
        """True when every row passes (no condition set)."""
        return (self.max_punsafe is None and self.max_pwatermark is None and not self.language
                and self.min_width <= 0 and self.min_height <= 0 and self.min_aesthetic is None)

    def passes(self, row: dict[str, Any]) -> bool:
        return ((self.max_punsafe is None or (row["punsafe"] or 0.0) <= self.max_punsafe)
                and (self.max_pwatermark is None or (row["pwatermark"] or 0.0) <= self.max_pwatermark)
                and (not self.language or row["LANGUAGE"] == self.language)
                and (row["WIDTH"] or 0) >= self.min_width and (row["HEIGHT"] or 0) >= self.min_height
                and (self.min_aesthetic is None or (row.get("aesthetic") is not None
                                                    and row["aesthetic"] >= self.min_aesthetic)))


FILTER_COLUMNS = ["punsafe", "pwatermark", "LANGUAGE", "WIDTH", "HEIGHT", "aesthetic"]


def search(index: OpenIndex, query: np.ndarray, modality: str = "image", num_result_ids: int = 100,
           num_images: int | None = None, removed: Collection[int] = frozenset(), deduplicate: bool = False,
           dedup_threshold: float = 0.94, where: RowFilter | None = None, columns: list[str] | None = None,
           violence: np.ndarray | None = None) -> list[Hit]:
    """The nearest rows to one query vector, best first: the top num_result_ids from faiss, minus removed rows,
    duplicates (when asked), rows whose embedding is nearer the second of the `violence` prompts (2 x dim, as
    clip-retrieval's violence detector) and rows failing `where` (safety by punsafe, watermark, language, size,
    aesthetic); then at most num_images of them."""
    q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
    q /= max(float(np.linalg.norm(q)), 1e-12)
    fx = index.faiss(modality)
    # Removed rows are dropped after the search, so ask for that many more (bounded: a long removal list thins
    # results rather than making every query scan the whole index).
    extra = min(len(removed), 10 * num_result_ids + 100)
    k = int(min(fx.ntotal, num_result_ids + extra))
    if k <= 0:
        return []
    embeddings = None
    if deduplicate or violence is not None:
        try:
            sims, ids, rec = fx.search_and_reconstruct(q, k)
            embeddings = rec[0]
        except RuntimeError:  # an index type without reconstruction: dedup needs the vectors, search without it
            sims, ids = fx.search(q, k)
    else:
        sims, ids = fx.search(q, k)
    if violence is not None and embeddings is None:  # the index cannot give the vectors: read them one by one
        embeddings = _reconstruct(fx, ids[0])
    valid = ids[0] >= 0
    ids_l, sims_l = ids[0][valid].tolist(), sims[0][valid].tolist()
    if embeddings is not None:
        embeddings = embeddings[valid]
    if where is not None and where.empty:
        where = None
    # The filter columns of every hit are read only when something filters on them: a plain query reads the
    # metadata of the rows it returns, once.
    columns_there = [c for c in FILTER_COLUMNS if c in index.metadata.column_names]
    looked = index.rows.rows(ids_l, columns_there) if where is not None else []
    keep = [i for i, row_id in enumerate(ids_l) if row_id not in removed][:num_result_ids]
    if embeddings is not None and keep:
        e = embeddings[keep]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        dropped = _dedup(e, dedup_threshold) if deduplicate else set()
        if violence is not None:
            dropped |= set(np.flatnonzero(np.argmax(e @ np.asarray(violence, np.float32).T, axis=1) == 1).tolist())
        keep = [p for j, p in enumerate(keep) if j not in dropped]
    if where is not None:
        keep = [p for p in keep if where.passes(looked[p])]
    keep = keep[: num_images if num_images is not None else num_result_ids]
    rows = index.rows.rows([ids_l[p] for p in keep], columns)
    return [Hit(ids_l[p], float(sims_l[p]), row) for p, row in zip(keep, rows, strict=True)]


def _reconstruct(fx: Any, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of search results (zeros where faiss keeps none it can give back)."""
    out = np.zeros((len(ids), fx.d), np.float32)
    for i, row in enumerate(ids.tolist()):
        if row >= 0:
            try:
                out[i] = fx.reconstruct(int(row))
            except RuntimeError:
                pass
    return out


def write_removed(folder: str, ids: Collection[int]) -> None:
    """Record rows (ids) removed after the index was built: the service filters them out of every result."""
    import pyarrow.parquet as pq

    with atomic_path(paths.index_files(folder).removed) as tmp:
        pq.write_table(pa.table({"id": pa.array(sorted(ids), pa.int64())}), tmp)


def read_removed(folder: str) -> frozenset[int]:
    """The row ids removed after the build (none when the file is absent)."""
    import pyarrow.parquet as pq

    path = paths.index_files(folder).removed
    if not os.path.exists(path):
        return frozenset()
    return frozenset(pq.read_table(path, columns=["id"])["id"].to_pylist())
