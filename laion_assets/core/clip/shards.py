"""Reading the download stage's shards for the CLIP stage: the complete shards a download lists, and their
samples decoded in DataLoader workers that split the shards between them, so the model is fed while images
are decoded.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from laion_assets.core.paths import ShardKeys
from laion_assets.core.storage import Storage


def downloaded_samples(store: Storage, shards: list[ShardKeys]) -> pa.Table:
    """key, sha256 and language of every successful download in the shards, sorted by key: what a valid score
    table covers."""
    tables = []
    with store.local_copies([s.rows for s in shards]) as local:
        for path in local:
            t = pq.read_table(path, columns=["key", "status", "sha256", "language"])
            tables.append(t.filter(pc.equal(t["status"], "success")).select(["key", "sha256", "language"]))
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                         "language": pa.array([], pa.string())})
    return pa.concat_tables(tables).sort_by("key")


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def iter_shard_samples(tar_path: str, keep: frozenset[str] | None = None) -> Iterator[Sample]:
    """The samples of one webdataset tar (members grouped by key, in file order)."""
    current: Sample | None = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field_name = member.name.rpartition("/")[2].partition(".")
            if current is not None and key != current.key:
                yield current
                current = None
            if keep is not None and key not in keep:
                continue
            if current is None:
                current = Sample(key, b"", "")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if field_name in ("jpg", "jpeg", "png", "webp"):
                current.image = data
            elif field_name == "txt":
                current.caption = data.decode("utf-8", "replace")
            elif field_name == "json":
                current.meta = json.loads(data)
    if current is not None:
        yield current


class _Decoded(torch.utils.data.IterableDataset):
    """Decoded, preprocessed samples; DataLoader workers take every n-th shard."""

    def __init__(self, tar_paths: list[str], transform: Any, size: int, keep: frozenset[str] | None) -> None:
        self.tar_paths, self.transform, self.size, self.keep = tar_paths, transform, size, keep

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str, str, str, str, str]]:
        info = torch.utils.data.get_worker_info()
        paths = self.tar_paths if info is None else self.tar_paths[info.id::info.num_workers]
        for path in paths:
            for s in iter_shard_samples(path, self.keep):
                error = ""
                try:
                    with Image.open(io.BytesIO(s.image)) as img:
                        tensor = self.transform(img.convert("RGB"))
                except Exception as err:  # noqa: BLE001 - one bad image is one failed row
                    tensor = torch.zeros(3, self.size, self.size)
                    error = f"cannot decode image: {type(err).__name__}: {err}"
                meta = s.meta
                yield (s.key, tensor, error, s.caption, str(meta.get("language") or ""), str(meta.get("url") or ""),
                       str(meta.get("sha256") or ""))


@dataclass
class Batch:
    keys: list[str]
    images: torch.Tensor
    errors: list[str]
    captions: list[str]
    languages: list[str]
    urls: list[str]
    sha256s: list[str]


def _collate(items: list[tuple[str, torch.Tensor, str, str, str, str, str]]) -> Batch:
    keys, tensors, errors, captions, languages, urls, sha256s = zip(*items, strict=True)
    return Batch(list(keys), torch.stack(tensors), list(errors), list(captions), list(languages), list(urls),
                 list(sha256s))


def _one_thread(_worker_id: int) -> None:
    # A decode worker needs one thread; torch's default (all cores) would fight the model for them.
    torch.set_num_threads(1)


def decoded_batches(tar_paths: list[str], transform: Any, size: int, batch_size: int, workers: int,
                    keep: frozenset[str] | None = None, pin: bool = False) -> Iterator[Batch]:
    dataset = _Decoded(sorted(tar_paths), transform, size, keep)
    workers = max(0, min(workers, len(tar_paths)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=pin,
        prefetch_factor=4 if workers else None, persistent_workers=False, worker_init_fn=_one_thread,
    )
    yield from loader
