"""Reading WAT records: FastWARC for well-formed files, a lenient reader for the rest, resynchronising after a
corrupt gzip member and flagging a truncated file.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fastwarc.warc import ArchiveIterator, WarcRecordType


@dataclass
class ReadStats:
    """What happened while reading one file's records."""

    records: int = 0
    bytes: int = 0
    corrupt_members: int = 0  # undecodable stretches skipped by resynchronising on the next record
    truncated: bool = False


_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_MAGIC = b"WARC/1."


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(3) == _GZIP_MAGIC


def _next_marker(fh: io.BufferedReader, start: int, marker: bytes) -> int | None:
    """Offset of the next occurrence of marker at or after start, or None."""
    fh.seek(start)
    carry = b""
    pos = start
    while block := fh.read(1 << 20):
        buf = carry + block
        idx = buf.find(marker)
        if idx >= 0:
            return pos - len(carry) + idx
        carry = buf[-(len(marker) - 1) :]
        pos += len(block)
    return None


def _member_complete(fh: io.BufferedReader, offset: int) -> bool:
    """Whether the gzip member starting at offset ends properly (FastWARC stops silently at a cut one)."""
    fh.seek(offset)
    d = zlib.decompressobj(31)
    while block := fh.read(1 << 16):
        d.decompress(block, 0)
        if d.eof:
            return True
    return d.eof


def _records_in(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(headers, payload) of each WARC record in a decompressed block, CRLF or bare-LF line ends."""
    pos = 0
    while True:
        start = block.find(_WARC_MAGIC, pos)
        if start < 0:
            return
        end = block.find(b"\n\n", start)
        crlf = block.find(b"\r\n\r\n", start)
        if crlf >= 0 and (end < 0 or crlf < end):
            end, sep = crlf, 4
        elif end >= 0:
            sep = 2
        else:
            return
        headers = block[start:end]
        length = 0
        for line in headers.split(b"\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or 0)
        body = end + sep
        yield headers, block[body : body + length]
        pos = body + length


def _lenient_metadata_records(path: str, stats: ReadStats, gz: bool) -> Iterator[tuple[int, bytes]]:
    """A slower reader for files FastWARC rejects (bare-LF headers, hand-edited excerpts)."""
    with open(path, "rb") as fh:
        data = fh.read()
    members: list[tuple[int, bytes]] = []
    if gz:
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            # Inflate in bounded pieces: handing zlib the whole rest of the file for every member would
            # copy it each time (quadratic on a full-size WAT file).
            d = zlib.decompressobj(31)
            parts = []
            feed = pos
            try:
                while not d.eof and feed < len(data):
                    parts.append(d.decompress(view[feed : feed + (1 << 16)]))
                    feed += 1 << 16
            except zlib.error:
                stats.corrupt_members += 1
                nxt = data.find(_GZIP_MAGIC, pos + 1)
                if nxt < 0:
                    break
                pos = nxt
                continue
            if not d.eof:
                stats.truncated = True
                break
            members.append((pos, b"".join(parts)))
            pos = min(feed, len(data)) - len(d.unused_data)
    else:
        members.append((0, data))
    for offset, block in members:
        for headers, payload in _records_in(block):
            if b"WARC-Type: metadata" in headers:
                stats.records += 1
                yield offset, payload


def iter_metadata_records(path: str, stats: ReadStats) -> Iterator[tuple[int, bytes]]:
    """(offset, JSON payload) of every WAT metadata record in a file, gzip members or plain.

    A corrupt gzip member does not end the file: reading resumes at the next record boundary after it,
    and the skipped stretch is counted. A file cut in the middle of its last record is flagged as
    truncated (its last, partial record is still yielded; its JSON will not parse).
    """
    stats.bytes = os.path.getsize(path)
    gz = _is_gzip(path)
    marker = _GZIP_MAGIC if gz else _WARC_MAGIC
    with open(path, "rb") as fh:
        start = 0
        last_pos = -1
        while True:
            fh.seek(start)
            yielded = False
            try:
                for rec in ArchiveIterator(fh, record_types=WarcRecordType.metadata, parse_http=False):
                    last_pos = rec.stream_pos  # absolute: FastWARC counts from the file start
                    yielded = True
                    stats.records += 1
                    yield last_pos, rec.reader.read()
                break
            except OSError:
                if last_pos < 0 and not yielded and start == 0:
                    # FastWARC refuses the very first record: not a corrupt member but a file it cannot
                    # parse (bare-LF headers). Read it the slow, lenient way.
                    yield from _lenient_metadata_records(path, stats, gz)
                    return
                if not yielded:  # the member at `start` itself is bad: it is skipped
                    stats.corrupt_members += 1
                # Past the last good record, or past the boundary that just failed, so each try advances.
                nxt = _next_marker(fh, (last_pos if yielded else start) + 1, marker)
                if nxt is None:
                    break
                start = nxt
        if gz and last_pos >= 0 and not _member_complete(fh, last_pos):
            stats.truncated = True
