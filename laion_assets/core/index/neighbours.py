"""Nearest indexed samples of many query vectors at once, in the crawls' stored kNN indices: what decontamination
(evaluation images) and the removals' neighbour sweep (removed samples) ask. Each crawl's index is opened from
storage (memory-mapped; on S3 a local copy), checked to hold embeddings of the queries' model and dimension, and
searched in batches; rows removed since its build are left out, as the service leaves them out.

The crawls' own indices are searched, not the merged `all`: each indexed sample is then found once, under its
crawl, and a crawl indexed but not merged yet is searched too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import EmbeddingModelMismatch
from laion_assets.core.index.search import IndexUnavailable, OpenIndex, open_index
from laion_assets.core.storage import Storage

# What a hit carries: enough to name the sample and to write a removal entry for it, never its image.
HIT_COLUMNS = ("URL", "key", "sha256", "phash", "caption")
QUERY_BATCH = 1024


def indexed_crawls(store: Storage, crawls: list[str] | None = None) -> list[str]:
    """The crawls (all stored, or those given) whose kNN index is complete (its report written last), in order."""
    if crawls is None:
        suffix = f"/knn_index/{paths.INDEX_REPORT}"
        crawls = sorted({k.split("/")[1] for k in store.list(paths.knn_indices_root()) if k.endswith(suffix)})
    return [c for c in sorted(crawls) if store.exists(paths.index_files(paths.knn_index(c)).report)]


@dataclass
class OpenIndices:
    """The crawls' indices that could be opened, and why the others could not."""

    indices: dict[str, OpenIndex] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def open_crawl_indices(store: Storage, crawls: list[str]) -> Iterator[OpenIndices]:
    """Each crawl's index opened for the block (an index that cannot be read is named with its reason, the rest
    used)."""
    out = OpenIndices()
    with contextlib.ExitStack() as stack:
        for crawl in crawls:
            try:
                folder = stack.enter_context(store.input_folder(paths.knn_index(crawl)))
                out.indices[crawl] = open_index(crawl, folder)
            except (IndexUnavailable, FileNotFoundError) as err:
                out.unavailable[crawl] = str(err)
        yield out


def check_model(index: OpenIndex, model: str, dim: int) -> None:
    """EmbeddingModelMismatch unless the index holds embeddings of `model` ("" when unknown) and `dim`: searching
    another model's space returns neighbours that mean nothing. An index or queries that do not name their model
    are held to the dimension alone."""
    indexed = str(index.report.get("model", "") or "")
    if dim != index.dim or (model and indexed and model != indexed):
        raise EmbeddingModelMismatch(
            f"the {index.name} index holds {indexed or 'embeddings of an unrecorded model'} ({index.dim}-d); the "
            f"queries are {model or 'an unnamed model'}'s ({dim}-d): embed them with the index's model")


def neighbours(index: OpenIndex, vectors: np.ndarray, k: int, min_similarity: float,
               columns: tuple[str, ...] = HIT_COLUMNS) -> pl.DataFrame:
    """Every indexed sample among the k nearest of each query (image index, inner product of normalized vectors:
    the cosine) with a similarity at or above `min_similarity`: `query` (the row of `vectors`), `id` (the index
    row), `similarity` and the metadata `columns` the index has; best first per query."""
    schema = {"query": pl.Int64, "id": pl.Int64, "similarity": pl.Float64}
    wanted = [c for c in columns if c in index.metadata.column_names]
    q = np.ascontiguousarray(np.asarray(vectors, np.float32))
    if not len(q) or not index.image.ntotal:
        return pl.DataFrame(schema=schema).with_columns(pl.lit(None, pl.String).alias(c) for c in wanted)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    # Rows removed since the build are dropped after the search: ask for that many more (bounded, as the service).
    kk = int(min(index.image.ntotal, k + min(len(index.removed), 10 * k + 100)))
    queries, ids, sims = [], [], []
    for lo in range(0, len(q), QUERY_BATCH):
        s, i = index.image.search(q[lo : lo + QUERY_BATCH], kk)
        keep = (i >= 0) & (s >= min_similarity)
        rows = np.nonzero(keep)
        queries.append(rows[0] + lo)
        ids.append(i[keep])
        sims.append(s[keep])
    frame = pl.DataFrame({"query": np.concatenate(queries).astype(np.int64), "id": np.concatenate(ids).astype(np.int64),
                          "similarity": np.concatenate(sims).astype(np.float64)})
    if index.removed:
        frame = frame.filter(~pl.col("id").is_in(sorted(index.removed)))
    # At most k per query after the removed rows are gone (faiss returns each query's hits best first).
    frame = frame.group_by("query", maintain_order=True).head(k)
    if wanted:
        rows = index.rows.rows(frame["id"].to_list(), wanted) if frame.height else []
        frame = pl.concat([frame, pl.DataFrame(rows, schema={c: pl.String for c in wanted})
                           if rows else pl.DataFrame(schema={c: pl.String for c in wanted})], how="horizontal")
    return frame.sort(["query", "similarity"], descending=[False, True], maintain_order=True)
