"""Reading the download stage's shards for the CLIP stage: the samples a download lists as successful, and the
samples of one shard (decoded by the CLIP pass's DataLoader workers, `onepass.py`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
