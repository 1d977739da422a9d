"""ViT-L/14 image and text embeddings of the kept samples, in clip-retrieval's layout, written so that a crash
never leaves arrays beside metadata they do not belong to.

A bucket's three files are written in this order: the old metadata is removed first (from then on the bucket
reads as incomplete), then the two arrays, then the new metadata, which records the arrays' sha256 and row
count. `read_embeddings` checks both, so a reader either gets the three files of one write or a clear error.
Embeddings someone else wrote in clip-retrieval's layout (LAION published LAION-5B's that way) have no such tags:
they are checked by rows and shapes.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa

from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.clip.models import LoadedClip
from laion_assets.core.clip.onepass import PassResult, StageReport
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.storage import Storage

EMBED_META_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                               ("language", pa.string())])
_IMG_SHA, _TXT_SHA, _ROWS = b"laion_assets.img_emb_sha256", b"laion_assets.text_emb_sha256", b"laion_assets.rows"


class EmbeddingModelMismatch(ValueError):
    """Embeddings of another model (or dimension) than those they are compared with: queries against an index
    (`index.neighbours.check_model`), a crawl's embeddings in the semantic dedup (`release.semdedup.check_model`).
    The message names both models and what to do."""


class IncompleteEmbeddingsError(RuntimeError):
    """A bucket's embedding files are missing or do not belong together (a write was interrupted)."""


def embedding_arrays(result: PassResult, model: LoadedClip) -> tuple[np.ndarray, np.ndarray, pa.Table, StageReport]:
    """A pass's embeddings sorted by key: image, text, metadata rows and the report."""
    report = result.embed_report
    dim = model.model.visual.output_dim
    img = np.concatenate(result.img_parts) if result.img_parts else np.zeros((0, dim), np.float16)
    txt = np.concatenate(result.txt_parts) if result.txt_parts else np.zeros((0, dim), np.float16)
    keys = result.embed_keys
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, dtype=np.int64)
    report.kept = len(keys)
    report.by_model = {model.spec.name: len(keys)}
    report.seconds = result.seconds
    table = pa.Table.from_pylist([result.embed_meta[i] for i in order], schema=EMBED_META_SCHEMA)
    return img[order], txt[order], table, report


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_embeddings(store: Storage, keys: EmbeddingKeys, img: np.ndarray, txt: np.ndarray, meta: pa.Table
                     ) -> EmbeddingsManifest:
    """The three files of one bucket: old metadata removed first, arrays, then metadata naming the arrays."""
    if not img.shape[0] == txt.shape[0] == meta.num_rows:
        raise ValueError(f"embeddings are not row-aligned: {img.shape[0]} image, {txt.shape[0]} text,"
                         f" {meta.num_rows} metadata rows")
    store.delete(keys.metadata)
    img_bytes, txt_bytes = _npy_bytes(img), _npy_bytes(txt)
    store.write_bytes(keys.img, img_bytes)
    store.write_bytes(keys.text, txt_bytes)
    img_sha, txt_sha = hashlib.sha256(img_bytes).hexdigest(), hashlib.sha256(txt_bytes).hexdigest()
    tagged = meta.replace_schema_metadata({
        **(meta.schema.metadata or {}), _IMG_SHA: img_sha.encode(), _TXT_SHA: txt_sha.encode(),
        _ROWS: str(meta.num_rows).encode()})
    store.write_parquet(keys.metadata, tagged)
    return EmbeddingsManifest(keys, meta.num_rows, int(img.shape[1]) if img.ndim == 2 else 0, img_sha, txt_sha)


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data))
    except (ValueError, OSError, EOFError) as err:
        raise IncompleteEmbeddingsError(f"{where} is not a readable .npy array ({err})") from err


def _check(meta: pa.Table, arrays: dict[bytes, tuple[bytes, str]], uri: str) -> None:
    """Our sha256 tags where the metadata has them (our writes); without them (clip-retrieval's own files), the
    arrays' rows and shapes are checked against the metadata by the caller."""
    tags = meta.schema.metadata or {}
    for tag, (data, _) in arrays.items():
        if tag in tags and hashlib.sha256(data).hexdigest().encode() != tags[tag]:
            raise IncompleteEmbeddingsError(f"the arrays beside {uri} are not the ones it was written with (an "
                                            "interrupted write): rematerialize image_embeddings")


def _aligned(meta: pa.Table, uri: str, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        if array.ndim != 2 or array.shape[0] != meta.num_rows:
            raise IncompleteEmbeddingsError(f"{name} beside {uri} has shape {array.shape} for {meta.num_rows} "
                                            "metadata rows: the files do not belong together")
    dims = {a.shape[1] for a in arrays.values()}
    if len(dims) > 1:
        raise IncompleteEmbeddingsError(f"the arrays beside {uri} have different dimensions {sorted(dims)}")


def _metadata(store: Storage, keys: EmbeddingKeys) -> pa.Table:
    if not store.exists(keys.metadata):
        raise IncompleteEmbeddingsError(f"{store.uri(keys.metadata)} is missing: the embeddings were not written "
                                        "completely (rematerialize image_embeddings)")
    return store.read_parquet(keys.metadata)


def read_embeddings(store: Storage, keys: EmbeddingKeys) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """A bucket's image and text embeddings and their metadata, checked to belong to one write: by our sha256 tags
    when the metadata has them, else (embeddings clip-retrieval wrote) by rows and shapes."""
    meta = _metadata(store, keys)
    uri = store.uri(keys.metadata)
    img_bytes, txt_bytes = store.read_bytes(keys.img), store.read_bytes(keys.text)
    _check(meta, {_IMG_SHA: (img_bytes, keys.img), _TXT_SHA: (txt_bytes, keys.text)}, uri)
    img, txt = _load_npy(img_bytes, store.uri(keys.img)), _load_npy(txt_bytes, store.uri(keys.text))
    _aligned(meta, uri, img_emb=img, text_emb=txt)
    return img, txt, meta.replace_schema_metadata(None)


def read_image_embeddings(store: Storage, keys: EmbeddingKeys) -> tuple[np.ndarray, pa.Table]:
    """A bucket's image embeddings and metadata alone (what the heads read; clip-retrieval may write no text
    embeddings), checked as `read_embeddings` checks them."""
    meta = _metadata(store, keys)
    uri = store.uri(keys.metadata)
    img_bytes = store.read_bytes(keys.img)
    _check(meta, {_IMG_SHA: (img_bytes, keys.img)}, uri)
    img = _load_npy(img_bytes, store.uri(keys.img))
    _aligned(meta, uri, img_emb=img)
    return img, meta.replace_schema_metadata(None)


def sample_keys(meta: pa.Table) -> pa.Array:
    """The samples' keys: ours and img2dataset's `key`, else clip-retrieval's `image_path`, else the row number."""
    for column in ("key", "image_path"):
        if column in meta.column_names:
            return meta[column].combine_chunks().cast(pa.string())
    return pa.array([str(i) for i in range(meta.num_rows)], pa.string())


def embedding_model(meta: pa.Table) -> str:
    """The embedding model our metadata records (its `model` column), "" for files that do not say."""
    if "model" not in meta.column_names or not meta.num_rows:
        return ""
    names = meta["model"].unique().drop_null().to_pylist()
    return names[0] if len(names) == 1 else ""
