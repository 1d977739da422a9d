"""Writing shards: results arrive in any order, are spilled to a local file, and are written in key order as
img2dataset lays a shard out (`.tar`, `.parquet` with a row per URL, `_stats.json` last). Its other two output
formats too (`ShardLayout`): `files` (a folder per shard of `{key}.jpg`, `.txt`, `.json`, beside the same
`.parquet` rows) and `parquet` (the rows with the image bytes and caption in `jpg` and `txt` columns, no tar).

A shard may be made in pieces (contiguous row ranges, by several processes); `write_shard` joins them, so
the bytes are the same however the work was split.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.download.plan import ShardPlan
from laion_assets.core.download.report import PAGE_OPT_OUT, ShardStats, is_transient
from laion_assets.core.storage import Storage

ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("http_status", pa.int32()),
    ("final_url", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("language", pa.string()),
    ("bytes_downloaded", pa.int64()),
    ("attempts", pa.int32()),  # image requests sent for this URL, over all runs (null: made before it was counted)
    ("runs", pa.int32()),  # downloads that tried this URL: 1, plus one for each --retry-failed that fetched it again
])


@dataclass(frozen=True)
class ShardLayout:
    """How a download's shards look beyond our defaults: the output format and the rows' added columns (the
    kept input columns with their Arrow types, the compute_hash column, exif)."""

    output_format: str = "webdataset"
    extra: pa.Schema | None = None
    hash_col: str = ""  # md5 or sha512 (sha256 is always a column)
    exif: bool = False
    image_field: str = "jpg"

    def schema(self) -> pa.Schema:
        fields = list(ROW_SCHEMA)
        if self.hash_col:
            fields.append(pa.field(self.hash_col, pa.string()))
        if self.exif:
            fields.append(pa.field("exif", pa.string()))
        if self.extra is not None:
            fields += list(self.extra)
        return pa.schema(fields)


# Values orjson would otherwise write as text (datetimes, dataclasses, str subclasses) raise, so that from_pylist
# judges them.
_STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS


def _json_exact(schema: pa.Schema) -> bool:
    """Whether every column is a string or an integer, whose values a JSON line carries exactly."""
    return all(pa.types.is_string(f.type) or pa.types.is_integer(f.type) for f in schema)


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """`pa.Table.from_pylist(rows, schema=schema)`, without pandas when it can: every `pa.array` of Python values
    imports pandas first (pyarrow asks whether they are a pandas object), a quarter of a second per worker with the
    GIL held, or a fork server preloading it. A schema of strings and integers (our rows, and most kept input
    columns) goes as JSON lines through Arrow's JSON reader instead: the same table (tested, with the same
    Parquet bytes). Anything the JSON path cannot take (another type, a value of the wrong type, a lone surrogate)
    goes through from_pylist, which converts it or raises as it always did."""
    if rows and _json_exact(schema):
        try:
            data = b"\n".join(orjson.dumps(row, option=_STRICT) for row in rows)
            # One block (so one chunk, as from_pylist makes) and no threads: a shard's rows are a few hundred KB.
            table = pa_json.read_json(
                io.BytesIO(data), read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1),
                parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        except (orjson.JSONEncodeError, pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        else:
            if table.num_rows == len(rows):
                return table.combine_chunks()
    return pa.Table.from_pylist(rows, schema=schema)


def new_row(key: str, url: str | None, caption: str | None, language: str | None) -> dict[str, Any]:
    """A URL's row before anything happened to it (a failed download until told otherwise)."""
    return {"key": key, "url": url, "caption": caption, "status": "failed_to_download", "error_message": None,
            "http_status": None, "final_url": None, "width": None, "height": None, "original_width": None,
            "original_height": None, "sha256": None, "phash": None, "language": language or "",
            "bytes_downloaded": 0, "attempts": 0, "runs": 1}


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar: members `{key}.{field}` with fields sorted and a fixed owner, as webdataset's
    TarWriter lays them out, written through tarfile directly (a third faster than TarWriter's streamed
    mode) with mtime 0, so that the same samples always give the same bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(members[name]), 0, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(members[name]))


@dataclass
class Piece:
    """The results of rows [lo, hi) of one shard: a row each, and where each sample's image files sit in the
    spill file (tar field, offset, length)."""

    shard: ShardPlan
    lo: int
    hi: int
    spill: str
    rows: list[dict[str, Any]]
    images: list[list[tuple[str, int, int]]]
    started: float = field(default_factory=time.perf_counter)

    def save(self) -> str:
        """Hand the piece to another process (the spill file stays where it is)."""
        path = self.spill + ".piece"
        with open(path, "wb") as fh:
            pickle.dump(self, fh)
        return path

    @staticmethod
    def load(path: str) -> Piece:
        with open(path, "rb") as fh:
            piece = pickle.load(fh)
        os.unlink(path)
        return piece


class PieceBuilder:
    """Collects the results of rows [lo, hi) in any order, spilling image bytes to a local file."""

    def __init__(self, shard: ShardPlan, lo: int, hi: int, staging: str) -> None:
        self.shard, self.lo, self.hi = shard, lo, hi
        self.rows: list[dict[str, Any] | None] = [None] * (hi - lo)
        self.images: list[list[tuple[str, int, int]]] = [[] for _ in range(hi - lo)]
        self.pending = hi - lo
        self.started = time.perf_counter()
        self.spill_path = os.path.join(staging, f"{shard.name}-{lo}.spill")
        self._spill = open(self.spill_path, "wb")  # noqa: SIM115 - closed in finish()
        self._offset = 0

    @property
    def whole(self) -> bool:
        return (self.lo, self.hi) == (self.shard.lo, self.shard.hi)

    def add(self, index: int, row: dict[str, Any], files: dict[str, bytes]) -> bool:
        """Record a result and its image files (tar field -> bytes); True when it was the piece's last."""
        for name, data in files.items():
            self._spill.write(data)
            self.images[index - self.lo].append((name, self._offset, len(data)))
            self._offset += len(data)
        self.rows[index - self.lo] = row
        self.pending -= 1
        return self.pending == 0

    def finish(self) -> Piece:
        self._spill.close()
        if any(r is None for r in self.rows):
            raise RuntimeError(f"shard {self.shard.name}: rows {self.lo}-{self.hi} finished with results missing")
        return Piece(self.shard, self.lo, self.hi, self.spill_path, self.rows, self.images,  # type: ignore[arg-type]
                     self.started)


def img2dataset_counts(stats: ShardStats, rows: list[dict[str, Any]], started: float) -> None:
    """The `_stats.json` fields img2dataset writes, beside ours (a skip or hash mismatch failed to download there)."""
    stats.successes = stats.statuses.get("success", 0)
    stats.failed_to_resize = stats.statuses.get("failed_to_resize", 0)
    stats.failed_to_download = stats.count - stats.successes - stats.failed_to_resize
    stats.status_dict = dict(Counter("success" if r["status"] == "success" else r["error_message"] or r["status"]
                                     for r in rows))
    stats.end_time = time.time()
    stats.start_time = stats.end_time - (time.perf_counter() - started)
    stats.duration = round(stats.end_time - stats.start_time, 3)


def _samples(pieces: list[Piece]) -> Iterator[tuple[str, dict[str, bytes]]]:
    for piece in pieces:
        with open(piece.spill, "rb") as spill:
            for row, files in zip(piece.rows, piece.images, strict=True):
                if not files:
                    continue
                images = {}
                for name, offset, length in files:
                    spill.seek(offset)
                    images[name] = spill.read(length)
                yield row["key"], sample_members(row, images)


def sample_members(row: dict[str, Any], images: dict[str, bytes]) -> dict[str, bytes]:
    """A sample's tar members: its caption, its row as JSON, and its image files."""
    return {"txt": (row["caption"] or "").encode("utf-8"), "json": orjson.dumps(row), **images}


def write_shard(pieces: list[Piece], store: Storage, prefix: str, settings: str, staging: str,
                layout: ShardLayout | None = None) -> ShardStats:
    """Commit one shard from its pieces (in row order): tar (or files), then parquet, then the stats marker."""
    if layout is not None and layout != ShardLayout():
        return _write_laid_out(pieces, store, prefix, settings, staging, layout)
    pieces = sorted(pieces, key=lambda p: p.lo)
    shard = pieces[0].shard
    gaps = any(a.hi != b.lo for a, b in zip(pieces, pieces[1:], strict=False))
    if gaps or (pieces[0].lo, pieces[-1].hi) != (shard.lo, shard.hi):
        raise RuntimeError(f"shard {shard.name}: pieces do not cover rows {shard.lo}-{shard.hi}")
    rows = [r for p in pieces for r in p.rows]
    keys = paths.shard(prefix, shard.name)
    stats = ShardStats(shard=shard.shard, name=shard.name, count=len(rows), rows=[shard.lo, shard.hi],
                       input_fingerprint=shard.fingerprint, settings=settings)
    count_rows(stats, rows)
    tar_path = os.path.join(staging, f"{shard.name}.tar")
    write_tar(tar_path, _samples(pieces))
    stats.bytes_written = os.path.getsize(tar_path)
    store.put_file(tar_path, keys.tar)
    _remove(tar_path)  # still there when the store is remote
    rows_path = os.path.join(staging, f"{shard.name}.parquet")
    pq.write_table(rows_table(rows, ROW_SCHEMA), rows_path, compression="zstd")
    store.put_file(rows_path, keys.rows)
    _remove(rows_path)
    for piece in pieces:
        _remove(piece.spill)
    stats.duration_s = round(time.perf_counter() - min(p.started for p in pieces), 3)
    img2dataset_counts(stats, rows, min(p.started for p in pieces))
    store.write_bytes(keys.stats, stats.to_json())
    return stats


def _check_pieces(pieces: list[Piece]) -> ShardPlan:
    shard = pieces[0].shard
    gaps = any(a.hi != b.lo for a, b in zip(pieces, pieces[1:], strict=False))
    if gaps or (pieces[0].lo, pieces[-1].hi) != (shard.lo, shard.hi):
        raise RuntimeError(f"shard {shard.name}: pieces do not cover rows {shard.lo}-{shard.hi}")
    return shard


def _write_laid_out(pieces: list[Piece], store: Storage, prefix: str, settings: str, staging: str,
                    layout: ShardLayout) -> ShardStats:
    """write_shard for added row columns or another output format; the webdataset path above stays as it was."""
    pieces = sorted(pieces, key=lambda p: p.lo)
    shard = _check_pieces(pieces)
    rows = [r for p in pieces for r in p.rows]
    keys = paths.shard(prefix, shard.name)
    stats = ShardStats(shard=shard.shard, name=shard.name, count=len(rows), rows=[shard.lo, shard.hi],
                       input_fingerprint=shard.fingerprint, settings=settings)
    count_rows(stats, rows)
    schema = layout.schema()
    if layout.output_format == "webdataset":
        tar_path = os.path.join(staging, f"{shard.name}.tar")
        write_tar(tar_path, _samples(pieces))
        stats.bytes_written = os.path.getsize(tar_path)
        store.put_file(tar_path, keys.tar)
        _remove(tar_path)
    elif layout.output_format == "files":
        for key, members in _samples(pieces):
            for name, data in members.items():
                store.write_bytes(paths.join(prefix, f"{shard.name}/{key}.{name}"), data)
                stats.bytes_written += len(data)
    table = rows_table(rows, schema)
    if layout.output_format == "parquet":
        images: list[bytes | None] = []
        for piece in pieces:
            with open(piece.spill, "rb") as spill:
                for files in piece.images:
                    found = None
                    for name, offset, length in files:
                        if name == layout.image_field:
                            spill.seek(offset)
                            found = spill.read(length)
                    images.append(found)
        captions = [(r["caption"] or "") if img is not None else None for r, img in zip(rows, images, strict=True)]
        table = table.append_column(pa.field(layout.image_field, pa.binary()), pa.array(images, pa.binary()))
        table = table.append_column(pa.field("txt", pa.string()), pa.array(captions, pa.string()))
    rows_path = os.path.join(staging, f"{shard.name}.parquet")
    pq.write_table(table, rows_path, compression="zstd")
    if layout.output_format == "parquet":
        stats.bytes_written = os.path.getsize(rows_path)
    store.put_file(rows_path, keys.rows)
    _remove(rows_path)
    for piece in pieces:
        _remove(piece.spill)
    started = min(p.started for p in pieces)
    stats.duration_s = round(time.perf_counter() - started, 3)
    img2dataset_counts(stats, rows, started)
    store.write_bytes(keys.stats, stats.to_json())
    return stats


def count_rows(stats: ShardStats, rows: list[dict[str, Any]]) -> None:
    """The marker's counts of a shard's rows."""
    stats.statuses = dict(Counter(r["status"] for r in rows))
    stats.errors = dict(Counter(r["error_message"] for r in rows if r["error_message"]))
    stats.bytes_downloaded = sum(r["bytes_downloaded"] or 0 for r in rows)
    stats.retryable = sum(is_transient(r["status"], r["error_message"], r["http_status"]) for r in rows)
    stats.page_opt_outs = sum(r["status"] == "skipped_by_policy" and (r["error_message"] or "").startswith(PAGE_OPT_OUT)
                              for r in rows)
    stats.runs = max((r.get("runs") or 1 for r in rows), default=1)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
