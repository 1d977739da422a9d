"""Evaluation-set decontamination: released samples that are evaluation images, found by the same image bytes
(sha256), a pHash within a radius, or an image cosine at or above a threshold in the crawls' kNN indices, and
written to the removal list as sha256 entries with reason `eval:<name>` (a sha256 entry keeps the image out of every
rebuild and every later crawl), with the matches counted per kind.

The evaluation set is a folder of images, a webdataset (a .tar, or a folder of them) or an embeddings folder in
clip-retrieval's layout (img_emb/, metadata/), local or on S3. An image is treated as the download treats a fetched
one: sha256 of the file's bytes, pHash of the stored (resized, re-encoded) image, embedded by the embedding CLIP
from that stored image, so that a copy of it on the web matches as the crawl stored it. A file that is not a
readable image is counted and named in the report, the rest used. An embeddings folder gives the cosine matches
(and sha256 / pHash ones where its metadata has those columns); embeddings of another model than an index's are
refused, naming both.

What an image set gives (hashes, embeddings, the unreadable files) is kept under
`evaluation/<name>/<fingerprint>.parquet` (the fingerprint: the source's listing, the embedding model and the resize
settings), so that checking the next crawl does not embed the set again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.index.neighbours import check_model, indexed_crawls, neighbours, open_crawl_indices
from laion_assets.core.progress import Log
from laion_assets.core.records import JsonRecord
from laion_assets.core.release import removals as rl
from laion_assets.core.release.release import ReleaseManifest
from laion_assets.core.settings import DecontaminationSettings, ModelSettings, ResizeSettings
from laion_assets.core.storage import Storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
KINDS = ("sha256", "phash", "cosine")  # a sample matched several ways counts under the first
SOURCE_KINDS = ("images", "webdataset", "embeddings")
REASON_PREFIX = "eval:"
MATCH_SCHEMA = {"eval": pl.String, "kind": pl.String, "crawl": pl.String, "key": pl.String, "URL": pl.String,
                "sha256": pl.String, "phash": pl.String, "similarity": pl.Float64, "distance": pl.Int64}


class EvaluationSourceError(ValueError):
    """An evaluation source that is not there or not one of the three kinds."""


def reason(name: str) -> str:
    """The removal reason of an evaluation set's matches."""
    return f"{REASON_PREFIX}{name}"


@dataclass
class EvalSet:
    """An evaluation set as hashes and embeddings: one row per usable image (sha256 / phash None where unknown),
    and the files that could not be used, with why."""

    kind: str
    names: list[str]
    sha256: list[str | None]
    phash: list[str | None]
    vectors: np.ndarray  # n x dim, float32, L2-normalized
    model: str  # the model the vectors are of ("" when the source does not say)
    unreadable: dict[str, str] = field(default_factory=dict)


# --- reading the evaluation set --------------------------------------------------------------------------------

def locate_source(source: str) -> tuple[Storage, list[str], str]:
    """The storage, keys and kind (images, webdataset, embeddings) of an evaluation source."""
    if source.endswith(".tar"):  # one webdataset shard
        folder, _, name = source.rstrip("/").rpartition("/")
        store = Storage(folder or ".")
        if not store.exists(name):
            raise EvaluationSourceError(f"no evaluation webdataset at {source}")
        return store, [name], "webdataset"
    store = Storage(source.rstrip("/") if source.startswith("s3://") else source)
    keys = store.list("")
    if not keys:
        raise EvaluationSourceError(f"no evaluation set at {source}: nothing there")
    if any(k.startswith("img_emb/") for k in keys) and any(k.startswith("metadata/") for k in keys):
        return store, [k for k in keys if k.startswith("metadata/")], "embeddings"
    tars = [k for k in keys if k.endswith(".tar")]
    if tars and not any(k.lower().endswith(IMAGE_SUFFIXES) for k in keys):
        return store, tars, "webdataset"
    return store, keys, "images"


def _images(store: Storage, keys: list[str], kind: str, unreadable: dict[str, str]
            ) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image of the source; a tar that cannot be read is named in `unreadable`."""
    if kind == "images":
        for key in keys:
            try:
                data = store.read_bytes(key)
            except OSError as err:
                unreadable[key] = f"cannot be read: {err}"
                continue
            yield key, data
        return
    for key in keys:
        try:
            with store.local_copies([key]) as (local,), tarfile.open(local, "r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        data = tar.extractfile(member)
                        if data is not None:
                            yield f"{key}:{member.name}", data.read()
        except (tarfile.TarError, OSError, EOFError) as err:
            unreadable[key] = f"not a readable tar: {err}"


def _read_embeddings(store: Storage, keys: list[str]) -> EvalSet:
    """An embeddings folder as an evaluation set: every bucket's image embeddings (a bucket that cannot be read is
    named in the report, the rest used)."""
    from laion_assets.core.clip.embeddings import (
        IncompleteEmbeddingsError,
        embedding_model,
        read_image_embeddings,
        sample_keys,
    )

    names: list[str] = []
    shas: list[str | None] = []
    hashes: list[str | None] = []
    parts, models, unreadable = [], set(), {}
    for number in paths.embedding_numbers(keys):
        files = paths.embedding_files("", number)
        try:
            img, meta = read_image_embeddings(store, files)
        except (IncompleteEmbeddingsError, FileNotFoundError, OSError) as err:
            unreadable[files.metadata] = str(err)
            continue
        names += [f"{number}:{k}" for k in sample_keys(meta).to_pylist()]
        for column, out in (("sha256", shas), ("phash", hashes)):
            out += meta[column].to_pylist() if column in meta.column_names else [None] * meta.num_rows
        parts.append(np.asarray(img, np.float32))
        models.add(embedding_model(meta))
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise EvaluationSourceError(f"the evaluation embeddings have different dimensions {sorted(dims)}")
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) if len(vectors) else 1.0
    return EvalSet("embeddings", names, shas, hashes, vectors, models.pop() if len(models) == 1 else "", unreadable)


def _embed_images(store: Storage, keys: list[str], kind: str, model: Any, resize: ResizeSettings, batch_size: int,
                  log: Log | None) -> EvalSet:
    """Hashes and embeddings of an image folder or webdataset, as the download and the CLIP stage make them."""
    import torch
    from PIL import Image

    from laion_assets.core.download.resize import ImageError, process_image

    # Evaluation images are often small (CIFAR's are 32 px): they are kept whatever the crawl's size limits.
    resize = dataclasses.replace(resize, min_image_size=0, max_aspect_ratio=0.0)
    names: list[str] = []
    shas: list[str | None] = []
    hashes: list[str | None] = []
    unreadable: dict[str, str] = {}
    parts: list[np.ndarray] = []
    pending: list[Any] = []

    def flush() -> None:
        if pending:
            parts.append(model.encode_pixels(torch.stack(pending)).astype(np.float32))
            pending.clear()

    for name, data in _images(store, keys, kind, unreadable):
        try:
            processed = process_image(data, resize)
            with Image.open(io.BytesIO(processed.data)) as stored:
                pixels = model.preprocess(stored.convert("RGB"))
        except (ImageError, OSError, ValueError) as err:
            unreadable[name] = str(err)
            continue
        names.append(name)
        shas.append(processed.sha256)
        hashes.append(processed.phash)
        pending.append(pixels)
        if len(pending) >= batch_size:
            flush()
            if log:
                log(f"embedded {len(names)} evaluation images")
    flush()
    dim = int(parts[0].shape[1]) if parts else 0
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return EvalSet(kind, names, shas, hashes, vectors, model.spec.name, unreadable)


def _fingerprint(source: str, store: Storage, keys: list[str], kind: str, spec: Any, resize: ResizeSettings) -> str:
    from laion_assets.core.clip.specs import weights_id

    doc = {"source": source, "kind": kind, "files": [[k, store.size(k)] for k in keys], "model": spec.name,
           "weights": weights_id(spec.arch, spec.pretrained), "resize": dataclasses.asdict(resize)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _save(store: Storage, key: str, eval_set: EvalSet) -> None:
    dim = eval_set.vectors.shape[1] if eval_set.vectors.ndim == 2 else 0
    usable = len(eval_set.names)
    errors = list(eval_set.unreadable.items())
    flat = pa.array(eval_set.vectors.reshape(-1), pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.nulls(usable, pa.list_(pa.float32()))
    table = pa.table({
        "name": eval_set.names + [n for n, _ in errors],
        "sha256": pa.array(eval_set.sha256 + [None] * len(errors), pa.string()),
        "phash": pa.array(eval_set.phash + [None] * len(errors), pa.string()),
        "embedding": pa.concat_arrays([vectors.cast(pa.list_(pa.float32())), pa.nulls(len(errors), pa.list_(
            pa.float32()))]),
        "error": pa.array([None] * usable + [e for _, e in errors], pa.string())})
    meta = {b"kind": eval_set.kind.encode(), b"model": eval_set.model.encode(), b"dim": str(dim).encode()}
    store.write_parquet(key, table.replace_schema_metadata(meta))


def _load(store: Storage, key: str) -> EvalSet:
    table = store.read_parquet(key)
    meta = table.schema.metadata or {}
    dim = int(meta.get(b"dim", b"0"))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    ok, bad = frame.filter(pl.col("error").is_null()), frame.filter(pl.col("error").is_not_null())
    vectors = (np.asarray(ok["embedding"].to_list(), np.float32).reshape(ok.height, dim) if ok.height
               else np.zeros((0, dim), np.float32))
    return EvalSet(meta.get(b"kind", b"images").decode(), ok["name"].to_list(), ok["sha256"].to_list(),
                   ok["phash"].to_list(), vectors, meta.get(b"model", b"").decode(),
                   dict(zip(bad["name"].to_list(), bad["error"].to_list(), strict=True)))


def read_eval_set(store: Storage, source: str, name: str, models: ModelSettings, resize: ResizeSettings,
                  log: Log | None = None, loader: Callable[[ModelSettings], Any] | None = None) -> tuple[EvalSet, bool]:
    """The evaluation set of a source, and whether it came from the stored copy (`evaluation/<name>/...`) rather
    than being hashed and embedded now. `loader` loads the embedding CLIP (default: the model set's)."""
    from laion_assets.core.clip.registry import resolve

    src, keys, kind = locate_source(source)
    if kind == "embeddings":
        return _read_embeddings(src, keys), False
    spec = resolve(models, check=False).embed
    key = paths.evaluation_set(name, _fingerprint(source, src, keys, kind, spec, resize))
    if store.exists(key):
        return _load(store, key), True
    model = (loader or _load_embedder)(models)
    eval_set = _embed_images(src, keys, kind, model, resize, models.batch_size, log)
    _save(store, key, eval_set)
    return eval_set, False


def _load_embedder(models: ModelSettings) -> Any:
    from laion_assets.core.clip.models import load_clip, pick_device
    from laion_assets.core.clip.registry import resolve

    return load_clip(resolve(models, check=False).embed, pick_device(models.device), models.embed_precision)


# --- matching the release --------------------------------------------------------------------------------------

def released_crawls(store: Storage, crawls: list[str] | None = None) -> list[str]:
    """The crawls (all stored, or those given) with a finished release, in order."""
    if crawls is None:
        suffix = f"/release/{paths.RELEASE_MANIFEST}"
        crawls = sorted({k.split("/")[1] for k in store.list("crawls") if k.endswith(suffix)})
    return [c for c in sorted(crawls) if store.exists(paths.release_manifest(c))]


def _hash_matches(store: Storage, crawl: str, eval_set: EvalSet, radius: int) -> pl.DataFrame:
    """Released samples of a crawl with an evaluation image's sha256 or a pHash within the radius of one (the
    removal list's matching, with the evaluation images as entries)."""
    entries, names = [], {}
    for name, sha, ph in zip(eval_set.names, eval_set.sha256, eval_set.phash, strict=True):
        for kind, value, r in (("sha256", sha, None), ("phash", ph, radius)):
            if value:
                try:
                    entry = rl.make_entry(kind, value, "eval", r)
                except rl.RemovalEntryError:  # a malformed hash in someone's metadata matches nothing
                    continue
                entries.append(entry)
                names.setdefault(entry.rule, name)
    if not entries:
        return pl.DataFrame(schema=MATCH_SCHEMA)
    matcher = rl.RemovalList("eval", tuple(entries))
    manifest = ReleaseManifest.from_json(store.read_bytes(paths.release_manifest(crawl)))
    found = []
    for part in manifest.part_keys():
        table = store.read_parquet(part, columns=["URL", "key", "sha256", "phash"])
        rules = matcher.match(table, url="no URL matching")
        rows = pl.from_arrow(table)
        assert isinstance(rows, pl.DataFrame)
        hit = rows.with_columns(pl.Series("rule", rules["rule"].to_pylist(), pl.String)).filter(
            pl.col("rule").is_not_null())
        if hit.height:
            found.append(hit)
    if not found:
        return pl.DataFrame(schema=MATCH_SCHEMA)
    hits = pl.concat(found)
    evals = [names[r] for r in hits["rule"].to_list()]
    kinds = [r.split(":", 1)[0] for r in hits["rule"].to_list()]
    distance = [bin(int(r.split(":", 1)[1].split("~")[0], 16) ^ int(p, 16)).count("1") if k == "phash" else None
                for r, k, p in zip(hits["rule"].to_list(), kinds, hits["phash"].to_list(), strict=True)]
    return hits.select(pl.Series("eval", evals, pl.String), pl.Series("kind", kinds, pl.String),
                       pl.lit(crawl, pl.String).alias("crawl"), "key", "URL", "sha256", "phash",
                       pl.lit(None, pl.Float64).alias("similarity"), pl.Series("distance", distance, pl.Int64))


@dataclass
class DecontaminationReport(JsonRecord):
    """What a decontamination found and wrote: the evaluation images used and those that could not be, the released
    samples matched per kind (each under the first kind that matched it: sha256, phash, cosine), the entries added
    to the removal list and its new version ("" when none was written)."""

    name: str
    source: str
    kind: str
    model: str = ""
    images: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    crawls: list[str] = field(default_factory=list)
    not_searched_by_cosine: dict[str, str] = field(default_factory=dict)  # crawl -> why (no index, unreadable)
    matches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    samples: int = 0
    eval_images_matched: int = 0
    entries_added: int = 0
    already_listed: int = 0
    version: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {self.matches.get(k, 0)}" for k in KINDS)
        written = f"removal list {self.version}" if self.version else "nothing written"
        return (f"{self.name}: {self.images} evaluation images ({len(self.unreadable)} unreadable); "
                f"{self.samples} released samples matched in {len(self.crawls)} crawls ({kinds}) by "
                f"{self.eval_images_matched} evaluation images; {self.entries_added} entries added, "
                f"{self.already_listed} already listed: {written}")

    def metadata(self) -> dict[str, Any]:
        return {"images": self.images, "unreadable": len(self.unreadable), "samples": self.samples,
                **{f"matches_{k}": self.matches.get(k, 0) for k in KINDS},
                "eval_images_matched": self.eval_images_matched, "entries_added": self.entries_added,
                "already_listed": self.already_listed, "removal_version": self.version or rl.NO_VERSION,
                "model": self.model, "cached": self.cached, "seconds": round(self.seconds, 2)}


def run(store: Storage, source: str, name: str, settings: DecontaminationSettings, models: ModelSettings,
        resize: ResizeSettings | None = None, crawls: list[str] | None = None, dry_run: bool = False,
        log: Log | None = None, loader: Callable[[ModelSettings], Any] | None = None
        ) -> tuple[DecontaminationReport, pl.DataFrame]:
    """The decontamination's entry point: the released samples of `crawls` (default: every released crawl) that are
    images of the evaluation set at `source`, written to the removal list as sha256 entries with reason
    `eval:<name>` (unless `dry_run`, or nothing new matched); returns the report and the matches (one row per
    evaluation image and released sample: eval, kind, crawl, key, URL, sha256, phash, similarity, distance).
    EmbeddingModelMismatch when the evaluation embeddings are of another model than an index's."""
    start = time.perf_counter()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EvaluationSourceError(f"an evaluation set's name is letters, digits, '.', '_' and '-' (e.g. "
                                    f"imagenet-val), not {name!r}")
    eval_set, cached = read_eval_set(store, source, name, models, resize or ResizeSettings(), log, loader)
    report = DecontaminationReport(name, source, eval_set.kind, eval_set.model, len(eval_set.names),
                                   eval_set.unreadable, cached)
    report.crawls = released_crawls(store, crawls)
    found = [_hash_matches(store, crawl, eval_set, settings.phash_radius) for crawl in report.crawls]
    with_index = indexed_crawls(store, report.crawls)
    report.not_searched_by_cosine = {c: "no complete kNN index" for c in report.crawls if c not in with_index}
    if len(eval_set.vectors) and eval_set.vectors.shape[1]:
        with open_crawl_indices(store, with_index) as opened:
            report.not_searched_by_cosine.update(opened.unavailable)
            for crawl, index in opened.indices.items():
                check_model(index, eval_set.model, int(eval_set.vectors.shape[1]))
                hits = neighbours(index, eval_set.vectors, settings.neighbours, settings.min_similarity)
                found.append(hits.select(
                    pl.col("query").replace_strict(dict(enumerate(eval_set.names)), return_dtype=pl.String)
                    .alias("eval"), pl.lit("cosine").alias("kind"), pl.lit(crawl, pl.String).alias("crawl"),
                    *(pl.col(c) if c in hits.columns else pl.lit(None, pl.String).alias(c)
                      for c in ("key", "URL", "sha256", "phash")),
                    "similarity", pl.lit(None, pl.Int64).alias("distance")))
    else:
        report.not_searched_by_cosine.update({c: "the evaluation set has no embeddings" for c in with_index})
    matches = pl.concat([f.cast(MATCH_SCHEMA) for f in found]) if found else pl.DataFrame(schema=MATCH_SCHEMA)
    order = {k: i for i, k in enumerate(KINDS)}
    matches = matches.sort(pl.col("kind").replace_strict(order, return_dtype=pl.Int8), "crawl", "key", "eval",
                           maintain_order=True)
    samples = matches.unique(["crawl", "key", "URL"], keep="first", maintain_order=True)
    report.samples = samples.height
    report.matches = {k: int((samples["kind"] == k).sum()) for k in KINDS}
    report.eval_images_matched = matches["eval"].n_unique()
    entries, report.already_listed = new_entries(rl.load(store), samples, reason(name))
    report.entries_added = len(entries)
    if entries and not dry_run:
        report.version = rl.add(store, entries)
    report.seconds = time.perf_counter() - start
    return report, matches


def new_entries(current: rl.RemovalList, samples: pl.DataFrame, why: str) -> tuple[list[rl.RemovalEntry], int]:
    """Removal entries for samples (sha256, or the URL where the sample has no sha256), less those the list has
    already (whatever their reason): (entries, how many were already listed)."""
    listed = {(e.kind, e.value) for e in current.entries}
    entries: list[rl.RemovalEntry] = []
    seen: set[tuple[str, str]] = set()
    already = 0
    for sha, url in samples.select("sha256", "URL").iter_rows():
        kind, value = ("sha256", sha.lower()) if sha else ("url", url)
        if not value or (kind, value) in seen:
            continue
        seen.add((kind, value))
        if (kind, value) in listed:
            already += 1
            continue
        entries.append(rl.make_entry(kind, value, why))
    return entries, already
