"""Building a crawl's kNN indices with autofaiss from clip-retrieval's embedding layout.

The caller passes the buckets' embedding files and a metadata table row-aligned with them (bucket after bucket, in
the embeddings' own row order, which `read_embeddings` checks by key). Excluded keys (the removal list) are dropped
from vectors and metadata alike before autofaiss sees them. The kept vectors are staged bucket by bucket as .npy
files that autofaiss streams (its embedding_reader), so building holds one bucket in memory beside autofaiss's own
budget. Files are written under temporary names and renamed; `_report.json` comes last and marks the folder
complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import embedding_model, read_embeddings, sample_keys
from laion_assets.core.index import metadata as meta
from laion_assets.core.index.evaluate import ExactTopK, Quality, measure, tune_nprobe
from laion_assets.core.index.search import MODALITIES, load_faiss
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.records import JsonRecord
from laion_assets.core.settings import IndexSettings
from laion_assets.core.storage import Storage, atomic_path


@dataclass
class ModalityReport:
    index_key: str = ""
    vectors: int = 0
    bytes: int = 0
    build_seconds: float = 0.0
    quality: dict[str, Any] = field(default_factory=dict)


@dataclass
class IndexReport(JsonRecord):
    """What building (or merging) made: per modality the index key, vectors, bytes, seconds, recall and latency."""

    rows_in: int = 0
    excluded: int = 0
    rows: int = 0
    dim: int = 0
    seconds: float = 0.0
    image: ModalityReport = field(default_factory=ModalityReport)
    text: ModalityReport = field(default_factory=ModalityReport)
    parts: list[str] = field(default_factory=list)
    model: str = ""  # the embedding model, as the embeddings' metadata names it ("" when it does not)

    def modality(self, name: str) -> ModalityReport:
        return self.image if name == "image" else self.text

    def metadata(self) -> dict[str, Any]:
        """Flat figures for asset metadata (part B) and the CLI's summary."""
        flat: dict[str, Any] = {"rows": self.rows, "excluded": self.excluded, "dim": self.dim,
                                "seconds": round(self.seconds, 2), "model": self.model}
        for m in MODALITIES:
            r = self.modality(m)
            flat.update({f"{m}_index_key": r.index_key, f"{m}_vectors": r.vectors, f"{m}_bytes": r.bytes,
                         f"{m}_build_seconds": round(r.build_seconds, 2),
                         **{f"{m}_{k}": v for k, v in r.quality.items()}})
        return flat


def read_report(folder: str) -> IndexReport:
    """The report of a complete index folder (FileNotFoundError when it is not complete)."""
    with open(paths.index_files(folder).report, "rb") as f:
        return IndexReport.from_json(f.read())


def write_report(path: str, report: IndexReport) -> None:
    """The folder's completion marker (written last)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(report.to_json())


def write_json(path: str, doc: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def _autofaiss(folder: str, modality: str, settings: IndexSettings, work: str) -> str:
    """autofaiss over the staged .npy folder into a temporary index file (+ infos); returns that file's path.

    autofaiss saves nothing itself (save_on_disk=False): under numpy 2 its infos hold numpy float32 values (NEP 50
    promotion) that its own json.dump rejects, so the index and its infos are written here."""
    import faiss
    from autofaiss import build_index

    out = os.path.join(work, f"{modality}.index")
    # embedding_reader draws tqdm bars on sys.stderr that verbose= does not reach: kept aside, shown only on failure.
    bars = io.StringIO()
    try:
        with contextlib.redirect_stderr(bars):
            index, infos = build_index(
                embeddings=folder, save_on_disk=False, metric_type="ip", index_key=settings.index_key or None,
                max_index_memory_usage=settings.query_memory, current_memory_available=settings.build_memory,
                max_index_query_time_ms=settings.max_query_ms, nb_cores=settings.cores or None,
                verbose=logging.WARNING)
    except BaseException:
        sys.stderr.write(bars.getvalue())
        raise
    if index is None:
        raise RuntimeError(f"autofaiss built no {modality} index from {folder} (its log says why: usually "
                           f"build_memory {settings.build_memory} is too small to train the index it chose)")
    faiss.write_index(index, out)
    with open(os.path.join(work, f"{modality}.infos.json"), "w") as f:
        json.dump(infos, f, default=_json_number, indent=1, sort_keys=True)
    return out


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def tune(index_path: str, infos_path: str, queries: np.ndarray, truth: np.ndarray, target: float) -> str | None:
    """Lower a built IVF index's nprobe to the smallest reaching recall@10 `target` on (queries, truth), from
    autofaiss's pick down (see evaluate.tune_nprobe), and record it in the infos' index_param, which `load_faiss`
    applies (autofaiss's own stays as index_param_autofaiss); returns the new index_param (None: not an IVF index,
    or no queries)."""
    import faiss

    with open(infos_path) as f:
        infos = json.load(f)
    original = infos.get("index_param_autofaiss", infos.get("index_param")) or ""
    index = load_faiss(index_path)
    if original:
        faiss.ParameterSpace().set_index_parameters(index, original)
    nprobe = tune_nprobe(index, queries, truth, target)
    if nprobe is None:
        return None
    param = (re.sub(r"(?<![\w.])nprobe=\d+", f"nprobe={nprobe}", original) if "nprobe=" in original
             else ",".join(p for p in (f"nprobe={nprobe}", original) if p))
    faiss.ParameterSpace().set_index_parameters(index, param)  # fails here, not in the service, if malformed
    infos.update(index_param=param, index_param_autofaiss=original, target_recall=target)
    write_json(infos_path, infos)
    return param


def _stage(store: Storage, buckets: list[EmbeddingKeys], table: pa.Table, exclude: Collection[str], work: str,
           sample: int, seed: int, log: Log | None, keep_rows: np.ndarray | None = None,
           models: set[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Write the kept vectors bucket by bucket under work/{img,text}_emb, checking row alignment by key; returns the
    kept mask and held-out queries per modality (the other modality's embeddings of sampled rows: a caption asking
    for images, an image asking for captions, as users query)."""
    keep = pc.invert(pc.is_in(table["key"], pa.array(list(exclude), pa.string()))).to_numpy(zero_copy_only=False)
    if keep_rows is not None:
        if len(keep_rows) != table.num_rows:
            raise meta.MetadataError(f"keep_rows has {len(keep_rows)} entries for {table.num_rows} metadata rows")
        keep = keep & np.asarray(keep_rows, bool)
    rng = np.random.default_rng(seed)
    picks = set(rng.choice(int(keep.sum()), size=min(sample, int(keep.sum())), replace=False).tolist())
    queries: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for sub in ("img_emb", "text_emb"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    offset = kept_before = 0
    for i, keys in enumerate(buckets):
        img, txt, bucket_meta = read_embeddings(store, keys)
        if models is not None:
            models.add(embedding_model(bucket_meta))
        n = bucket_meta.num_rows
        if offset + n > table.num_rows:
            raise meta.MetadataError(f"index metadata has {table.num_rows} rows, the embeddings at least {offset + n}")
        if not sample_keys(bucket_meta).equals(table["key"].slice(offset, n).combine_chunks()):
            raise meta.MetadataError(f"index metadata rows {offset}..{offset + n} are not the keys of "
                                     f"{store.uri(keys.metadata)}: pass the metadata row-aligned with the embeddings")
        mask = keep[offset : offset + n]
        np.save(os.path.join(work, "img_emb", f"img_emb_{i}.npy"), img[mask])
        np.save(os.path.join(work, "text_emb", f"text_emb_{i}.npy"), txt[mask])
        local = [j for j in range(int(mask.sum())) if kept_before + j in picks]
        queries["image"].append(txt[mask][local])
        queries["text"].append(img[mask][local])
        offset += n
        kept_before += int(mask.sum())
        if log:
            log(f"staged bucket {i}: {int(mask.sum())} of {n} rows kept")
    if offset != table.num_rows:
        raise meta.MetadataError(f"index metadata has {table.num_rows} rows, the embeddings {offset}")
    dim = img.shape[1] if buckets else 0
    return keep, {m: np.concatenate(q) if q else np.zeros((0, dim), np.float32) for m, q in queries.items()}, dim


def _exact_truth(folder: str, queries: np.ndarray) -> np.ndarray:
    top = ExactTopK(queries)
    first = 0
    for name in sorted(os.listdir(folder), key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0])):
        arr = np.load(os.path.join(folder, name), mmap_mode="r")
        for lo in range(0, len(arr), meta.BATCH_ROWS):
            top.add(arr[lo : lo + meta.BATCH_ROWS], first + lo)
        first += len(arr)
    return top.ids


def build_index(store: Storage, buckets: list[EmbeddingKeys], table: pa.Table, out_dir: str,
                settings: IndexSettings | None = None, exclude: Collection[str] = (), work_dir: str | None = None,
                log: Log | None = None, keep_rows: np.ndarray | None = None) -> IndexReport:
    """A crawl's `image.index` and `text.index` (+ infos), `metadata.arrow` row-aligned with both, and
    `_report.json` with recall@10 and p50/p99 query ms, in the local folder out_dir.

    Rows whose key is in `exclude`, or whose entry in the boolean mask `keep_rows` (one per table row) is False,
    are left out. The mask is for callers whose keys repeat across buckets (img2dataset numbers each bucket's
    shards from zero), where excluding by key would drop other buckets' samples too."""
    start = time.perf_counter()
    settings = settings or IndexSettings()
    table = meta.conform(table)
    files = paths.index_files(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(files.report):
        os.remove(files.report)  # from here on the folder reads as incomplete
    report = IndexReport(rows_in=table.num_rows)
    with tempfile.TemporaryDirectory(prefix="index-", dir=work_dir) as work:
        # Twice the held-out queries when nprobe is tuned: every other one tunes it, the rest measure the result.
        sample = settings.eval_queries * (2 if settings.target_recall else 1)
        models: set[str] = set()
        keep, queries, dim = _stage(store, buckets, table, exclude, work, sample, settings.seed, log, keep_rows,
                                    models)
        report.rows, report.excluded, report.dim = int(keep.sum()), int((~keep).sum()), int(dim)
        report.model = models.pop() if len(models) == 1 else ""
        if report.rows == 0:
            raise ValueError(f"nothing to index in {out_dir}: {report.rows_in} rows, {report.excluded} excluded")
        meta.write_arrow([table.filter(pa.array(keep))], table.schema, files.metadata)
        for modality, sub in (("image", "img_emb"), ("text", "text_emb")):
            t0 = time.perf_counter()
            built = _autofaiss(os.path.join(work, sub), modality, settings, work)
            r = report.modality(modality)
            r.build_seconds = time.perf_counter() - t0
            # work may be on another disk than out_dir: moved into a temporary beside the file, then renamed.
            with atomic_path(files.index(modality)) as tmp:
                shutil.move(built, tmp)
            with atomic_path(files.infos(modality)) as tmp:
                shutil.move(os.path.join(work, f"{modality}.infos.json"), tmp)
            with open(files.infos(modality)) as f:
                r.index_key = json.load(f).get("index_key", "")
            r.bytes = os.path.getsize(files.index(modality))
            held_out = queries[modality]
            if len(held_out):
                truth = _exact_truth(os.path.join(work, sub), held_out)
                if settings.target_recall:
                    tune(files.index(modality), files.infos(modality), held_out[1::2], truth[1::2],
                         settings.target_recall)
                    held_out, truth = held_out[::2], truth[::2]
            index = load_faiss(files.index(modality), files.infos(modality))
            r.vectors = int(index.ntotal)
            if len(held_out):
                r.quality = measure(index, held_out, truth).as_dict()
            if log:
                log(f"{modality} index {r.index_key}: {r.vectors} vectors, {r.bytes} bytes, "
                    f"{r.build_seconds:.1f} s, {r.quality}")
    if os.path.exists(files.removed):
        os.remove(files.removed)  # removals recorded against the old build are excluded from this one
    report.seconds = time.perf_counter() - start
    write_report(files.report, report)
    return report


__all__ = ["IndexReport", "ModalityReport", "Quality", "build_index", "read_report", "tune"]
