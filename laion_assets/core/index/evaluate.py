"""Measuring an index as it is built: recall@10 against exact inner-product search on held-out queries, and the
latency of single queries."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

K = 10


class ExactTopK:
    """Exact top-k inner product of a few queries over vectors that arrive in batches (never all in memory)."""

    def __init__(self, queries: np.ndarray, k: int = K) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def add(self, vectors: np.ndarray, first_id: int) -> None:
        if len(vectors) == 0 or len(self.queries) == 0:
            return
        sims = self.queries @ np.asarray(vectors, np.float32).T
        ids = np.broadcast_to(np.arange(first_id, first_id + len(vectors)), sims.shape)
        scores = np.concatenate([self.scores, sims], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, top, axis=1)
        self.ids = np.take_along_axis(all_ids, top, axis=1)


@dataclass(frozen=True)
class Quality:
    queries: int
    recall_at_10: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"eval_queries": self.queries, "recall_at_10": round(self.recall_at_10, 4),
                "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3)}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of the exact top-k that the index returned (per query, then averaged)."""
    if len(truth) == 0:
        return 0.0
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def measure(index: Any, queries: np.ndarray, truth: np.ndarray, k: int = K) -> Quality:
    """Recall@k and single-query latency of a faiss index (queries one at a time on one thread, as the service
    runs them: its concurrency comes from parallel requests, not from OpenMP inside one query)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _measure(index, queries, truth, k)
    finally:
        faiss.omp_set_num_threads(threads)


def _measure(index: Any, queries: np.ndarray, truth: np.ndarray, k: int) -> Quality:
    found = np.full((len(queries), k), -1, np.int64)
    times = np.zeros(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        _, ids = index.search(queries[i : i + 1], k)
        times[i] = (time.perf_counter() - start) * 1000
        found[i] = ids[0]
    if len(queries) == 0:
        return Quality(0, 0.0, 0.0, 0.0)
    return Quality(len(queries), recall_at_k(found, truth), float(np.percentile(times, 50)),
                   float(np.percentile(times, 99)))


def tune_nprobe(index: Any, queries: np.ndarray, truth: np.ndarray, target: float, k: int = K) -> int | None:
    """Lower an IVF index's nprobe to the smallest that reaches recall@k `target` on (queries, truth), never above
    the nprobe it has (autofaiss's pick: the most lists a query can scan within its max_query_ms, on average, on an
    idle machine). None, and the index untouched, when it is not IVF or there are no queries.

    autofaiss maximizes recall under a mean-time budget, so its nprobe spends that whole budget: single-query p99
    was 4 to 9 times the 10 ms goal at 1M x 768 under load, for recall the target needed a fraction of the lists
    for. Recall grows with nprobe (not strictly, so this is a bisection over a near-monotone curve)."""
    import faiss

    if len(queries) == 0:
        return None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def reaches(nprobe: int) -> bool:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k)
        return recall_at_k(found, truth) >= target

    lo, hi = 1, max(1, int(ivf.nprobe))
    if reaches(hi):
        while lo < hi:
            mid = (lo + hi) // 2
            if reaches(mid):
                hi = mid
            else:
                lo = mid + 1
    ivf.nprobe = hi
    return hi
