"""TensorFlow's checkpoint bundle (`variables/variables.index` and `variables.data-*` of a SavedModel) read without
TensorFlow: what the AutoKeras NSFW detectors LAION published are made of.

The index is a LevelDB-format table (TensorFlow's `core/lib/io/table`): data blocks of prefix-compressed entries
with a restart array, an index block naming them, and a 48-byte footer ending in the table magic; every block is
followed by its compression byte and the masked crc32c of the two. Its keys are tensor names; the empty key holds
the `BundleHeaderProto` (shard count, endianness), every other one a `BundleEntryProto` (dtype, shape, shard,
offset, size, masked crc32c of the bytes), which the data shard holds raw, in little-endian order (strings as
their varint lengths, the lengths' masked crc32c, then the bytes). Both protos are parsed by protobuf itself, from
descriptors declared here with their field numbers (tensorflow/core/protobuf/tensor_bundle.proto).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48
BLOCK_TRAILER = 5
MASK_DELTA = 0xA282EAD8
# TensorFlow's DataType numbers (tensorflow/core/framework/types.proto) that heads are made of.
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"), 5: np.dtype("<i2"),
          6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"), 19: np.dtype("<f2")}
DT_STRING = 7


class BundleError(ValueError):
    """A checkpoint bundle that is not one, or is damaged (the message names the file and what is wrong)."""


def masked_crc32c(data: bytes, crc: int = 0) -> int:
    import crc32c

    return mask(crc32c.crc32c(data, crc))


def mask(crc: int) -> int:
    """TensorFlow's and LevelDB's masking of a stored crc32c."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("varint past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


@functools.cache
def _messages() -> tuple[Any, Any]:
    """The BundleHeaderProto and BundleEntryProto classes, from descriptors declared with TensorFlow's field
    numbers (only the fields read here: the wire format skips the others)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="laion_assets_tensor_bundle.proto", package="laion_assets.tf",
                                              syntax="proto3")

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("Dim", [("size", 1, f.TYPE_INT64, one, ""), ("name", 2, f.TYPE_STRING, one, "")])
    message("TensorShapeProto", [("dim", 2, f.TYPE_MESSAGE, many, ".laion_assets.tf.Dim"),
                                 ("unknown_rank", 3, f.TYPE_BOOL, one, "")])
    message("BundleHeaderProto", [("num_shards", 1, f.TYPE_INT32, one, ""), ("endianness", 2, f.TYPE_INT32, one, "")])
    message("BundleEntryProto", [
        ("dtype", 1, f.TYPE_INT32, one, ""), ("shape", 2, f.TYPE_MESSAGE, one, ".laion_assets.tf.TensorShapeProto"),
        ("shard_id", 3, f.TYPE_INT32, one, ""), ("offset", 4, f.TYPE_INT64, one, ""),
        ("size", 5, f.TYPE_INT64, one, ""), ("crc32c", 6, f.TYPE_FIXED32, one, ""),
        ("slices", 7, f.TYPE_BYTES, many, "")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("laion_assets.tf.BundleHeaderProto")),
            get(pool.FindMessageTypeByName("laion_assets.tf.BundleEntryProto")))


def _block(data: bytes, offset: int, size: int, where: str) -> bytes:
    """A table block's contents, its trailer checked (no compression: TensorFlow writes bundles uncompressed)."""
    end = offset + size
    if offset < 0 or end + BLOCK_TRAILER > len(data):
        raise BundleError(f"{where}: a block at {offset}+{size} runs past the end of the file ({len(data)} bytes)")
    contents, kind = data[offset:end], data[end]
    stored = struct.unpack_from("<I", data, end + 1)[0]
    if masked_crc32c(data[offset:end + 1]) != stored:
        raise BundleError(f"{where}: the block at {offset} fails its crc32c (a damaged file)")
    if kind != 0:
        raise BundleError(f"{where}: the block at {offset} is compressed (type {kind}); only uncompressed bundle "
                          "indices are read")
    return contents


def _entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """A block's (key, value) entries: shared prefix length, unshared length, value length, key suffix, value."""
    if len(block) < 4:
        raise BundleError(f"{where}: a block too short for its restart count")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise BundleError(f"{where}: a block's restart array is larger than the block")
    out, pos, key = [], 0, b""
    try:
        while pos < limit:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            length, pos = _varint(block, pos)
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            out.append((key, block[pos:pos + length]))
            pos += length
    except IndexError as err:
        raise BundleError(f"{where}: a block entry runs past its block") from err
    if pos != limit:
        raise BundleError(f"{where}: a block's entries overrun its restart array")
    return out


def _handle(buf: bytes, pos: int) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def read_table(data: bytes, where: str = "variables.index") -> dict[bytes, bytes]:
    """Every (key, value) of a LevelDB-format table file."""
    if len(data) < FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise BundleError(f"{where}: not a TensorFlow checkpoint index (no table magic at its end)")
    footer = data[len(data) - FOOTER_BYTES:]
    try:
        _, _, pos = _handle(footer, 0)  # the metaindex block (empty in bundles)
        index_offset, index_size, _ = _handle(footer, pos)
    except IndexError as err:
        raise BundleError(f"{where}: a damaged table footer") from err
    table: dict[bytes, bytes] = {}
    for _, handle in _entries(_block(data, index_offset, index_size, where), where):
        try:
            offset, size, _ = _handle(handle, 0)
        except IndexError as err:
            raise BundleError(f"{where}: a damaged block handle in the index block") from err
        table.update(_entries(_block(data, offset, size, where), where))
    return table


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int


def read_index(data: bytes, where: str = "variables.index") -> tuple[int, dict[str, TensorEntry]]:
    """The bundle's shard count and its tensors' entries (by name)."""
    header_cls, entry_cls = _messages()
    from google.protobuf.message import DecodeError

    table = read_table(data, where)
    if b"" not in table:
        raise BundleError(f"{where}: no bundle header (the table's empty key)")
    try:
        header = header_cls.FromString(table.pop(b""))
        if header.endianness != 0:
            raise BundleError(f"{where}: a big-endian bundle")
        entries = {}
        for key, value in table.items():
            e = entry_cls.FromString(value)
            if len(e.slices):
                raise BundleError(f"{where}: tensor {key.decode()!r} is saved in slices (partitioned variables)")
            entries[key.decode()] = TensorEntry(key.decode(), e.dtype, tuple(d.size for d in e.shape.dim),
                                                e.shard_id, e.offset, e.size, e.crc32c)
    except DecodeError as err:
        raise BundleError(f"{where}: an entry is not a BundleEntryProto ({err})") from err
    return max(1, header.num_shards), entries


def _strings(raw: bytes, count: int, entry: TensorEntry, where: str) -> np.ndarray:
    """A string tensor: `count` varint lengths, their masked crc32c, then the bytes (crc32c as TensorFlow's
    WriteStringTensor computes it: over each length as 4 bytes (8 past 2**32), the lengths' checksum, then the
    strings)."""
    import crc32c

    pos, lengths, crc = 0, [], 0
    for _ in range(count):
        n, pos = _varint(raw, pos)
        lengths.append(n)
        crc = crc32c.crc32c(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n), crc)
    stored = raw[pos:pos + 4]
    if struct.unpack("<I", stored)[0] != mask(crc):
        raise BundleError(f"{where}: the lengths of {entry.name!r} fail their crc32c")
    crc = crc32c.crc32c(stored, crc)
    pos += 4
    out = []
    for n in lengths:
        out.append(raw[pos:pos + n])
        crc = crc32c.crc32c(raw[pos:pos + n], crc)
        pos += n
    if mask(crc) != entry.crc32c:
        raise BundleError(f"{where}: tensor {entry.name!r} fails its crc32c (a damaged file)")
    return np.array(out, dtype=object)


@dataclass
class Bundle:
    """A checkpoint bundle's tensors, read from its files' bytes."""

    entries: dict[str, TensorEntry]
    shards: list[bytes]
    where: str = "checkpoint"

    def tensor(self, name: str) -> np.ndarray:
        """A tensor by its checkpoint name, its crc32c checked."""
        if name not in self.entries:
            raise BundleError(f"{self.where}: no tensor {name!r} (it has {len(self.entries)} tensors)")
        e = self.entries[name]
        if e.shard >= len(self.shards):
            raise BundleError(f"{self.where}: tensor {name!r} is in shard {e.shard}, the bundle has {len(self.shards)}")
        raw = self.shards[e.shard][e.offset:e.offset + e.size]
        if len(raw) != e.size:
            raise BundleError(f"{self.where}: tensor {name!r} runs past the end of its data file (truncated)")
        count = int(np.prod(e.shape)) if e.shape else 1
        if e.dtype == DT_STRING:
            return _strings(raw, count, e, self.where).reshape(e.shape)
        if e.dtype not in DTYPES:
            raise BundleError(f"{self.where}: tensor {name!r} has TensorFlow dtype {e.dtype}, not read here")
        if masked_crc32c(raw) != e.crc32c:
            raise BundleError(f"{self.where}: tensor {name!r} fails its crc32c (a damaged file)")
        return np.frombuffer(raw, DTYPES[e.dtype], count).reshape(e.shape).copy()

    def names(self) -> list[str]:
        return sorted(self.entries)


def data_file_names(prefix: str, shards: int) -> list[str]:
    """`variables.data-00000-of-00001` and its siblings."""
    return [f"{prefix}.data-{i:05d}-of-{shards:05d}" for i in range(shards)]


def read_bundle(files: dict[str, bytes], prefix: str = "variables", where: str = "checkpoint") -> Bundle:
    """A bundle from a mapping of file names (as in the variables/ folder) to bytes."""
    index = f"{prefix}.index"
    if index not in files:
        raise BundleError(f"{where}: no {index}")
    shards, entries = read_index(files[index], os.path.join(where, index))
    names = data_file_names(prefix, shards)
    missing = [n for n in names if n not in files]
    if missing:
        raise BundleError(f"{where}: data file(s) {', '.join(missing)} missing")
    return Bundle(entries, [files[n] for n in names], where)
