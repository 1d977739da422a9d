"""Merging crawls' indices into one (the `all` indice), with faiss's on-disk inverted lists.

Indices built separately by autofaiss have different coarse quantizers (and may not be IVF at all), so their
inverted lists cannot be concatenated as they are. The merge trains one IVF quantizer on a sample of every part's
vectors, fills one IVF shard per part with that part's vectors under global ids, and joins the shards with
`faiss.contrib.ondisk.merge_ondisk`: the merged lists live in `<modality>.ivfdata`, read memory-mapped, so neither
merging nor serving holds all of them in RAM. A part's vectors are read back from its index (`reconstruct_n`,
exact for flat, HNSW and IVF-Flat indices, the index's own approximation for quantized ones), in batches; the
embeddings are not needed again. The metadata files are concatenated in the same order, with an `indice` column
naming each row's part.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.index import metadata as meta
from laion_assets.core.index.build import IndexReport, read_report, tune, write_json, write_report
from laion_assets.core.index.evaluate import ExactTopK, measure
from laion_assets.core.index.search import MODALITIES, faiss_quiet, load_faiss
from laion_assets.core.progress import Log
from laion_assets.core.settings import IndexSettings
from laion_assets.core.storage import atomic_path

TRAIN_PER_LIST = 64


def _reconstructible(index: Any) -> Any:
    """The index, able to give back vector i (IVF indices need their id -> list map for that)."""
    import faiss

    try:
        faiss.extract_index_ivf(index).make_direct_map()
    except RuntimeError:
        pass  # not an IVF index: reconstruction works as it is
    return index


def _vectors(index: Any, batch: int = meta.BATCH_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first id, vectors) batches of everything in an index."""
    for lo in range(0, index.ntotal, batch):
        n = min(batch, index.ntotal - lo)
        yield lo, index.reconstruct_n(lo, n)


def _key(total: int, dim: int, settings: IndexSettings) -> tuple[str, int]:
    """The merged index's factory string and nlist: flat codes when they fit the query budget, else 8-bit scalar
    quantization, else PQ."""
    from autofaiss.utils.cast import cast_memory_to_bytes

    nlist = settings.merged_nlist or max(1, min(int(4 * math.sqrt(total)), total // 39 or 1))
    budget = cast_memory_to_bytes(settings.query_memory)
    if total * dim * 4 <= budget:
        return f"IVF{nlist},Flat", nlist
    if total * dim <= budget:
        return f"IVF{nlist},SQ8", nlist
    return f"IVF{nlist},PQ{max(1, dim // 8)}", nlist


def merge_indices(parts: dict[str, str], out_dir: str, settings: IndexSettings | None = None,
                  work_dir: str | None = None, log: Log | None = None) -> IndexReport:
    """Merge complete index folders ({indice name: folder}, in that order) into out_dir."""
    import faiss
    from autofaiss.utils.cast import cast_memory_to_bytes
    from faiss.contrib.ondisk import merge_ondisk

    settings = settings or IndexSettings()
    if not parts:
        raise ValueError("no indices to merge")
    start = time.perf_counter()
    files = paths.index_files(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(files.report):
        os.remove(files.report)
    reports = {name: read_report(folder) for name, folder in parts.items()}  # FileNotFoundError: a part unfinished
    report = IndexReport(parts=list(parts), rows_in=sum(r.rows for r in reports.values()),
                         rows=sum(r.rows for r in reports.values()), dim=next(iter(reports.values())).dim)
    names = {r.model for r in reports.values()}
    report.model = names.pop() if len(names) == 1 else ""  # the crawls' common embedding model
    rng = np.random.default_rng(settings.seed)
    with tempfile.TemporaryDirectory(prefix="merge-", dir=work_dir) as work:
        for modality in MODALITIES:
            t0 = time.perf_counter()
            key, nlist = _key(report.rows, report.dim, settings)
            indices = [_reconstructible(load_faiss(paths.index_files(f).index(modality),
                                                   paths.index_files(f).infos(modality))) for f in parts.values()]
            # A training sample drawn evenly from every part, and held-out queries (the other modality's vectors
            # would need a second pass; a perturbed sample of this one's is as unseen by the index).
            want = min(report.rows, nlist * TRAIN_PER_LIST)
            train, queries = [], []
            for ix in indices:
                share = max(1, want * ix.ntotal // max(1, report.rows))
                picks = np.sort(rng.choice(ix.ntotal, size=min(share, ix.ntotal), replace=False))
                train.append(np.stack([ix.reconstruct(int(i)) for i in picks]))
            sample = np.concatenate(train).astype(np.float32)
            # Twice the held-out queries when nprobe is tuned (as build_index does): half tune, half measure.
            tuning = bool(settings.target_recall) and not settings.merged_nprobe
            if settings.eval_queries:
                wanted = settings.eval_queries * (2 if tuning else 1)
                rows = rng.choice(len(sample), size=min(wanted, len(sample)), replace=False)
                q = sample[rows] + rng.normal(scale=0.05, size=(len(rows), sample.shape[1])).astype(np.float32)
                queries = [q / np.linalg.norm(q, axis=1, keepdims=True)]
            trained = faiss.index_factory(report.dim, key, faiss.METRIC_INNER_PRODUCT)
            trained.train(sample)
            trained_path = os.path.join(work, f"{modality}.trained.index")
            faiss.write_index(trained, trained_path)
            exact = ExactTopK(np.concatenate(queries) if queries else np.zeros((0, report.dim), np.float32))
            # Shards are written whenever their codes reach half the build budget, so that merging a part holds at
            # most that much of it in memory, however large the part.
            flush_at = max(1, cast_memory_to_bytes(settings.build_memory) // 2
                           // max(1, faiss.extract_index_ivf(trained).code_size))
            shards: list[str] = []
            shard, offset = faiss.read_index(trained_path), 0
            for ix in indices:
                for lo, vectors in _vectors(ix):
                    shard.add_with_ids(vectors, np.arange(offset + lo, offset + lo + len(vectors), dtype=np.int64))
                    exact.add(vectors, offset + lo)
                    if shard.ntotal >= flush_at:
                        shards.append(os.path.join(work, f"{modality}.shard{len(shards)}.index"))
                        faiss.write_index(shard, shards[-1])
                        shard = faiss.read_index(trained_path)
                offset += ix.ntotal
            if shard.ntotal or not shards:
                shards.append(os.path.join(work, f"{modality}.shard{len(shards)}.index"))
                faiss.write_index(shard, shards[-1])
            del shard
            merged = faiss.read_index(trained_path)
            with faiss_quiet():
                merge_ondisk(merged, shards, files.ivfdata(modality))
            faiss.extract_index_ivf(merged).nprobe = settings.merged_nprobe or max(16, nlist // 8)
            with atomic_path(files.index(modality)) as tmp:
                faiss.write_index(merged, tmp)
            params = f"nprobe={faiss.extract_index_ivf(merged).nprobe}"
            write_json(files.infos(modality), {"index_key": key, "index_param": params, "nb vectors": offset,
                                                "parts": list(parts)})
            del merged
            r = report.modality(modality)
            r.index_key, r.vectors = key, offset
            r.bytes = os.path.getsize(files.index(modality)) + os.path.getsize(files.ivfdata(modality))
            r.build_seconds = time.perf_counter() - t0
            if len(exact.queries):
                queries_m, truth = exact.queries, exact.ids
                if tuning and len(queries_m) >= 2:
                    # The merged lists start at merged_nprobe's default (nlist / 8, at least 16): lowered to the
                    # recall target like a crawl's index, so `all` answers as fast as its parts.
                    tune(files.index(modality), files.infos(modality), queries_m[0::2], truth[0::2],
                         settings.target_recall)
                    queries_m, truth = queries_m[1::2], truth[1::2]
                served = load_faiss(files.index(modality), files.infos(modality))
                r.quality = measure(served, queries_m, truth).as_dict()
            if log:
                log(f"merged {modality} index {key}: {offset} vectors from {len(parts)} indices, {r.quality}")

    def tagged() -> Iterator[pa.Table]:
        for name, folder in parts.items():
            table = meta.open_arrow(paths.index_files(folder).metadata)
            if "indice" in table.column_names:  # a merged part's rows are tagged with the part's name
                table = table.drop_columns(["indice"])
            yield meta.complete(table.append_column("indice", pa.array([name] * table.num_rows, pa.string())))

    meta.write_arrow(tagged(), meta.complete(meta.empty()).schema, files.metadata)
    report.seconds = time.perf_counter() - start
    write_report(files.report, report)
    return report
