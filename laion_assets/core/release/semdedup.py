"""Semantic dedup (SemDeDup, Abbas et al. 2023, arXiv 2303.09540) on image embeddings: k-means clusters, and within
each cluster every pair of samples whose cosine similarity is at least `1 - eps`, in memory bounded by a partition
size rather than by the number of samples, and with winners that do not depend on the order samples came in.

The winner rule is the image dedup's (`dedup.py`): samples are ordered by crawl, bucket and key, each handled as a
64-bit sid that compares as its name does, and a sample is a semantic duplicate of the *first* sample in that order
with which it forms a pair (`semantic_duplicate_of`; like `near_duplicate_of`, not transitive). Samples that do not
compete (removed ones) are never added: they can neither win nor be marked.

Two levels of k-means keep the work linear in the number of samples. A flat k-means with clusters of a fixed size
needs n / cluster_rows centroids, and assigning n samples to them costs n^2 / cluster_rows: quadratic. Here a coarse
k-means of about n / partition_rows centroids (trained on a sample of at most COARSE_TRAIN_PER_CENTROID rows per
centroid, chosen by a hash of the sid so that it does not depend on the input order) routes every sample to a
partition, spilled to disk as raw float16 rows (like the image dedup's partitions); each partition, read back alone,
gets its own k-means of about rows / cluster_rows centroids, and the pairs are searched within each of those
clusters, in row blocks of at most BLOCK_CELLS similarities. What is in memory at once is one source, one partition
and one block: the memory does not grow with the crawl, and the pairwise work grows as n x cluster_rows.

Pairs that k-means puts in two clusters are missed, as in SemDeDup itself: the benchmark measures how many against
an exact all-pairs search (benchmarks/bench_semdedup.py).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from laion_assets.core.clip.embeddings import EmbeddingModelMismatch
from laion_assets.core.release.dedup import SOURCE_SHIFT, sample_names

if TYPE_CHECKING:
    import polars as pl

COARSE_TRAIN_PER_CENTROID = 256  # faiss' own default cap of training points per centroid
FINE_TRAIN_PER_CENTROID = 64
KMEANS_ITERATIONS = 20
KMEANS_SEED = 20261202
BLOCK_CELLS = 1 << 24  # similarities one block of the pairwise step holds (64 MB of float32)
CHUNK_ROWS = 65_536  # rows routed to partitions at once
SECOND_REACH = 1.0  # see `assign`
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class SemanticCounts:
    samples: int = 0
    duplicates: int = 0
    pairs: int = 0
    partitions: int = 0
    clusters: int = 0
    largest_cluster: int = 0
    spilled: bool = False
    coarse_seconds: int = 0  # rows also compared in their second partition
    fine_seconds: int = 0  # rows (copies) also compared in their second cluster


def check_model(found: str, expected: str, dim: int, expected_dim: int, where: str) -> None:
    """EmbeddingModelMismatch naming both models when embeddings are not those of the expected model."""
    if found and expected and found != expected:
        raise EmbeddingModelMismatch(
            f"{where}: the embeddings are {found}'s, but semantic dedup compares {expected}'s embeddings (the "
            f"embedding model): re-embed with {expected}, or set the embedding model to {found} for every crawl")
    if expected_dim and dim != expected_dim:
        raise EmbeddingModelMismatch(
            f"{where}: the embeddings are {dim}-d ({found or 'an unnamed model'}), but semantic dedup compares "
            f"{expected_dim}-d embeddings of {expected or 'the first source'}: they come from another model")


def _mix(sids: np.ndarray) -> np.ndarray:
    """A 64-bit mix of the sids (splitmix64's finaliser): a sample chosen by it does not depend on input order."""
    with np.errstate(over="ignore"):
        z = sids.astype(np.uint64) * _GOLDEN
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _kmeans(train: np.ndarray, k: int, seed: int):
    """Spherical faiss k-means (centroids on the unit sphere: nearest by inner product is nearest by cosine)."""
    import faiss

    km = faiss.Kmeans(train.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(COARSE_TRAIN_PER_CENTROID, math.ceil(len(train) / k)))
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    return km


def assign(km, x: np.ndarray, eps: float, reach: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid, and its second nearest where a partner within the threshold may well be there
    (else -1).

    A partner b of a (|a - b| <= sqrt(2 eps)) nearest to c2 has (c1 - c2).a <= (c1 - c2).(a - b): a row is cut
    from its partners only when its margin over c2 is smaller than that projection. Compared there whenever the
    margin is below |c1 - c2| sqrt(2 eps) (the worst case) nearly every row would be a guest in high dimension;
    `reach` standard deviations of the projection of a random direction (|c1 - c2| sqrt(2 eps) / sqrt(dim)) catch
    most such pairs for a fraction of the rows (the benchmark measures both)."""
    k = km.centroids.shape[0]
    if k == 1:
        return np.zeros(len(x), np.int64), np.full(len(x), -1, np.int64)
    c1, c2 = np.empty(len(x), np.int64), np.empty(len(x), np.int64)
    for start in range(0, len(x), CHUNK_ROWS):  # float32 a chunk at a time: x may be a float16 partition
        chunk = np.ascontiguousarray(x[start:start + CHUNK_ROWS], dtype=np.float32)
        _, labels = km.index.search(chunk, 2)
        first, second = labels[:, 0].astype(np.int64), labels[:, 1].astype(np.int64)
        # From the centroids themselves: spherical k-means searches by inner product, the plain one by L2.
        axis = km.centroids[first] - km.centroids[second]
        margin = np.einsum("ij,ij->i", chunk, axis)
        reachable = margin <= reach * np.linalg.norm(axis, axis=1) * math.sqrt(2 * eps / x.shape[1])
        c1[start:start + len(chunk)] = first
        c2[start:start + len(chunk)] = np.where(reachable, second, -1)
    return c1, c2


def min_common(a1: np.ndarray, a2: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """The smallest cluster two rows share (each in its first and, unless -1, its second cluster)."""
    big = np.iinfo(np.int64).max
    first = np.where((a1 == b1) | (a1 == b2), a1, big)
    second = np.where((a2 >= 0) & ((a2 == b1) | (a2 == b2)), a2, big)
    return np.minimum(first, second)


def cluster_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within one cluster (rows in sid order, L2-normalised): for each row the first earlier row with cosine >=
    threshold (-1: none) and that similarity, and every pair as (later, earlier) row indices. Row blocks of at most
    BLOCK_CELLS similarities against the rows before the block's end."""
    m = len(x)
    first = np.full(m, -1, np.int64)
    sims = np.zeros(m, np.float32)
    found = []
    step = max(1, BLOCK_CELLS // max(1, m))
    for start in range(0, m, step):
        stop = min(m, start + step)
        s = x[start:stop] @ x[:stop].T
        # Only earlier rows (j < i) count: the diagonal and what lies right of it are masked out.
        s[np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]] = -2.0
        i, j = np.nonzero(s >= threshold)
        if not len(i):
            continue
        # np.nonzero walks rows in order and columns in order: a row's first hit is its earliest partner.
        rows, at = np.unique(i, return_index=True)
        first[start + rows] = j[at]
        sims[start + rows] = s[rows, j[at]]
        found.append(np.stack([i + start, j], axis=1))
    return first, sims, (np.concatenate(found) if found else np.zeros((0, 2), np.int64))


class SemanticDeduper:
    """The semantic dedup of many sources, each added once (in any order).

    `sources`: every (crawl, bucket) that will be added (fixes the order of samples); `expected_rows`: about how
    many samples will be added (sizes the coarse k-means); `on_pairs`: given every pair found as two sid arrays
    (later, earlier), for the benchmark."""

    def __init__(self, sources: list[tuple[str, str]], eps: float, work: str, expected_rows: int,
                 partition_rows: int, cluster_rows: int, dim: int = 0,
                 on_pairs: Callable[[np.ndarray, np.ndarray], None] | None = None, reach: float = SECOND_REACH) -> None:
        if partition_rows < 1 or cluster_rows < 1:
            raise ValueError(f"partition and cluster rows must be at least 1, not {partition_rows}, {cluster_rows}")
        if not 0 < eps < 1:
            raise ValueError(f"semantic_eps must be between 0 and 1 (cosine >= 1 - eps), not {eps}")
        self.sources = sorted(set(sources))
        self.ordinal = {s: i for i, s in enumerate(self.sources)}
        self.threshold = 1.0 - eps
        self.work, self.partition_rows, self.cluster_rows = work, partition_rows, cluster_rows
        self.dim, self.on_pairs, self.reach = dim, on_pairs, reach
        self.partitions = max(1, math.ceil(max(1, expected_rows) / partition_rows))
        # The share of samples kept to train the coarse k-means, about COARSE_TRAIN_PER_CENTROID per centroid.
        self.train_share = min(1.0, COARSE_TRAIN_PER_CENTROID * self.partitions / max(1, expected_rows))
        self.added: set[int] = set()
        self.raw: list[str] = []
        self.train: list[np.ndarray] = []
        self.counts = SemanticCounts(partitions=self.partitions)
        for folder in ("raw", "parts", "keys"):
            os.makedirs(os.path.join(work, folder), exist_ok=True)

    def add(self, crawl: str, bucket: str, keys: pl.Series, embeddings: np.ndarray, competes: np.ndarray
            ) -> pl.DataFrame:
        """Add a source: its keys, their L2-normalised embeddings (row-aligned) and whether each competes. Returns
        the keys sorted with their `sid`. Only competing rows are kept (spilled as float16)."""
        import polars as pl

        source = self.ordinal[(crawl, bucket)]
        if source in self.added:
            raise ValueError(f"{crawl}/{bucket} was added twice")
        if embeddings.ndim != 2 or len(embeddings) != len(keys):
            raise ValueError(f"{crawl}/{bucket}: {len(keys)} keys but embeddings of shape {embeddings.shape}")
        if len(keys) and self.dim and embeddings.shape[1] != self.dim:
            raise EmbeddingModelMismatch(f"{crawl}/{bucket}: {embeddings.shape[1]}-d embeddings among {self.dim}-d "
                                         "ones: they come from another model")
        if len(keys):
            self.dim = self.dim or embeddings.shape[1]
        self.added.add(source)
        frame = pl.DataFrame({"key": keys.cast(pl.String), "_row": np.arange(len(keys)),
                              "competes": np.asarray(competes, bool)})
        ordered = frame.sort("key").with_row_index("sid").with_columns(
            (pl.col("sid").cast(pl.UInt64) + (source << SOURCE_SHIFT)).alias("sid"))
        ordered.select("key").write_ipc(self._keys_file(source), compression="uncompressed")
        chosen = ordered.filter(pl.col("competes"))
        if chosen.height:
            sids = chosen["sid"].to_numpy()
            rows = embeddings[chosen["_row"].to_numpy()].astype(np.float16)
            path = os.path.join(self.work, "raw", f"{source:08d}")
            np.save(path + ".sid.npy", sids)
            np.save(path + ".emb.npy", rows)
            self.raw.append(path)
            picked = _mix(sids) < np.uint64(min(2**64 - 1, int(self.train_share * 2**64)))
            if picked.any():
                self.train.append(rows[picked])
        return ordered.select("key", "sid")

    def _keys_file(self, source: int) -> str:
        return os.path.join(self.work, "keys", f"{source:08d}.arrow")

    def _partition_files(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Every competing row routed to its coarse partition (and to its second, where a partner could be there,
        see `assign`); yields each partition (number, sids, float16 rows, each row's two partitions) in turn, its
        files deleted once read."""
        if self.partitions == 1 or not self.train:
            sids = [np.load(p + ".sid.npy") for p in self.raw]
            embs = [np.load(p + ".emb.npy") for p in self.raw]
            if sids:
                n = sum(len(s) for s in sids)
                yield 0, np.concatenate(sids), np.concatenate(embs), np.stack(
                    [np.zeros(n, np.int64), np.full(n, -1, np.int64)], axis=1)
            return
        self.counts.spilled = True
        train = np.concatenate(self.train)
        self.train = []
        km = _kmeans(train, min(self.partitions, len(train)), KMEANS_SEED)
        del train
        folder = os.path.join(self.work, "parts")
        for path in self.raw:
            sids, embs = np.load(path + ".sid.npy"), np.load(path + ".emb.npy", mmap_mode="r")
            for start in range(0, len(sids), CHUNK_ROWS):
                chunk = np.asarray(embs[start:start + CHUNK_ROWS])
                chunk_sids = sids[start:start + CHUNK_ROWS]
                p1, p2 = assign(km, chunk, 1 - self.threshold, self.reach)
                self.counts.coarse_seconds += int((p2 >= 0).sum())
                both = np.stack([p1, p2], axis=1)
                rows = np.concatenate([np.arange(len(chunk)), np.nonzero(p2 >= 0)[0]])
                labels = np.concatenate([p1, p2[p2 >= 0]])
                order = np.argsort(labels, kind="stable")
                edges = np.searchsorted(labels[order], np.arange(km.k + 1))
                for part in np.nonzero(np.diff(edges))[0]:
                    picked = rows[order[edges[part]:edges[part + 1]]]
                    base = os.path.join(folder, f"{part:06d}")
                    for suffix, data in ((".sid", chunk_sids[picked]), (".emb", chunk[picked]),
                                         (".part", both[picked])):
                        with open(base + suffix, "ab") as f:
                            f.write(np.ascontiguousarray(data).tobytes())
            del embs
            os.unlink(path + ".sid.npy")
            os.unlink(path + ".emb.npy")
        self.raw = []
        for part in range(km.k):
            base = os.path.join(folder, f"{part:06d}")
            if not os.path.exists(base + ".sid"):
                continue
            sids = np.fromfile(base + ".sid", np.uint64)
            embs = np.fromfile(base + ".emb", np.float16).reshape(len(sids), self.dim)
            parts = np.fromfile(base + ".part", np.int64).reshape(len(sids), 2)
            for suffix in (".sid", ".emb", ".part"):
                os.unlink(base + suffix)
            yield part, sids, embs, parts

    def finish(self) -> pl.DataFrame:
        """The marks: sid, semantic_duplicate_of (sid), semantic_similarity, one row per sample marked."""
        import polars as pl

        marked_sids, winners, similarities = [], [], []
        eps = 1 - self.threshold
        for part, sids, embs, parts in self._partition_files():
            order = np.argsort(sids, kind="stable")
            # Kept as float16 (half the memory of the partition in float32); a cluster is widened when compared.
            sids, parts, x = sids[order], parts[order], embs[order]
            del embs
            self.counts.samples += int((parts[:, 0] == part).sum())
            k = max(1, min(len(sids), round(len(sids) / self.cluster_rows)))
            if k > 1:
                sample = x[_mix(sids) < np.uint64(min(2**64 - 1, int(
                    min(1.0, FINE_TRAIN_PER_CENTROID * k / len(sids)) * 2**64)))]
                c1, c2 = assign(_kmeans(sample if len(sample) >= k else x, k, KMEANS_SEED + 1), x, eps, self.reach)
                self.counts.fine_seconds += int((c2 >= 0).sum())
            else:
                c1, c2 = np.zeros(len(sids), np.int64), np.full(len(sids), -1, np.int64)
            # Each cluster's rows: those nearest to it and those compared there too, in sid order.
            rows = np.concatenate([np.arange(len(sids)), np.nonzero(c2 >= 0)[0]])
            labels = np.concatenate([c1, c2[c2 >= 0]])
            grouping = np.lexsort((rows, labels))
            rows, labels = rows[grouping], labels[grouping]
            edges = np.searchsorted(labels, np.arange(k + 1))
            for c in range(k):
                members = rows[edges[c]:edges[c + 1]]
                if not len(members):
                    continue
                self.counts.clusters += 1
                self.counts.largest_cluster = max(self.counts.largest_cluster, len(members))
                if len(members) < 2:
                    continue
                first, sims, pairs = cluster_pairs(x[members].astype(np.float32), self.threshold)
                hit = first >= 0
                marked_sids.append(sids[members[hit]])
                winners.append(sids[members[first[hit]]])
                similarities.append(sims[hit])
                if len(pairs):
                    # A pair compared in several clusters (or partitions) counts once: in the smallest both share.
                    a, b = members[pairs[:, 0]], members[pairs[:, 1]]
                    once = ((min_common(parts[a, 0], parts[a, 1], parts[b, 0], parts[b, 1]) == part)
                            & (min_common(c1[a], c2[a], c1[b], c2[b]) == c))
                    self.counts.pairs += int(once.sum())
                    if self.on_pairs is not None and once.any():
                        self.on_pairs(sids[a[once]], sids[b[once]])
        shutil.rmtree(os.path.join(self.work, "parts"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.work, "raw"), ignore_errors=True)
        marks = pl.DataFrame({
            "sid": np.concatenate(marked_sids) if marked_sids else np.zeros(0, np.uint64),
            "semantic_duplicate_of": np.concatenate(winners) if winners else np.zeros(0, np.uint64),
            "semantic_similarity": np.concatenate(similarities) if similarities else np.zeros(0, np.float32)},
            schema={"sid": pl.UInt64, "semantic_duplicate_of": pl.UInt64, "semantic_similarity": pl.Float32})
        # A sample compared in two clusters keeps the earliest partner of either.
        marks = marks.sort("sid", "semantic_duplicate_of").unique("sid", keep="first", maintain_order=True)
        self.counts.duplicates = marks.height
        return marks

    def names(self, sids: pl.Series) -> pl.DataFrame:
        """sid -> `crawl/bucket/key` for the given sids (those that won something)."""
        return sample_names(sids, self.sources, self._keys_file)
