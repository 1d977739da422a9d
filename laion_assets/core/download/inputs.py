"""URL lists in every format img2dataset reads, streamed: txt, csv, tsv, json, jsonl and parquet, each also
gzipped (`.gz`), one file or a folder of them, local, `s3://` or `https://`.

Everything is read in batches of bounded size (pyarrow's streaming CSV reader, Parquet's `iter_batches`, JSON
lines a block at a time), so reading a list of a billion rows holds one batch, not the list. What comes out is the
same for every format: record batches of `url`, `caption` and `language` (strings, null when the list has no such
column) followed by the columns asked to be kept, under their own names. Bad input never crashes a read and never
drops a row silently: a missing column is an error naming it and the columns there are, a malformed line (a CSV
row with the wrong number of fields, a JSON line that does not parse or is not an object) is counted in
`ReadCounts` and the rest is kept, an unknown format is refused with the list of known ones.

A JSON file (`json`, not `jsonl`) holding one array is read whole, as img2dataset reads it (pandas' `read_json`);
a `.json` file of one object per line is streamed as JSON lines.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from laion_assets.core.settings import USER_AGENT
from laion_assets.core.storage import Storage

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
INPUT_FORMATS = tuple(f for base in FORMATS for f in (base, f"{base}.gz"))
BATCH_ROWS = 65_536
STANDARD = ("url", "caption", "language")


class InputError(ValueError):
    """A URL list that cannot be read as asked: unknown format, missing column, no files."""


@dataclass(frozen=True)
class InputSpec:
    """Where a URL list is, in which format, and which of its columns are read."""

    location: str  # a file or a folder: local, s3://bucket/key or https://
    input_format: str = ""  # one of INPUT_FORMATS; empty: from the file name(s)
    url_col: str = "url"
    caption_col: str = "caption"
    language_col: str = "language"
    keep: tuple[str, ...] = ()  # other columns, kept under their own names
    optional: tuple[str, ...] = ()  # columns kept as text when the list has them (the crawl's page_url, robots)

    def __post_init__(self) -> None:
        if self.input_format:
            check_format(self.input_format)


@dataclass
class ReadCounts:
    """What a read met: files, rows kept, malformed lines skipped (with a few examples)."""

    files: int = 0
    rows: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)

    def bad(self, where: str, what: str) -> None:
        self.malformed += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {what[:200]}")


def check_format(input_format: str) -> str:
    if input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {input_format!r}: use one of {', '.join(INPUT_FORMATS)}")
    return input_format


def format_of(name: str) -> str | None:
    """The input format a file name says (`x.tsv.gz` -> tsv.gz), or None."""
    lower = name.lower().rsplit("?", 1)[0]
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):
        if lower.endswith("." + fmt):
            return fmt
    return None


# --- where the files are ---------------------------------------------------------------------------------------

def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _s3_storage(bucket: str) -> Storage:
    return Storage(f"s3://{bucket}")


def list_inputs(location: str, input_format: str = "") -> list[str]:
    """The files of a URL list: the file itself, or a folder's files of the format (sorted, as img2dataset's glob)."""
    if location.startswith(("http://", "https://")):
        return [location]  # a web server lists no folders
    if location.startswith("s3://"):
        bucket, key = _s3_parts(location)
        store = _s3_storage(bucket)
        if key and store.exists(key):
            return [location]
        found = store.list(key.rstrip("/"))
        files = [f"s3://{bucket}/{k}" for k in found]
    elif os.path.isdir(location):
        files = sorted(os.path.join(location, n) for n in os.listdir(location))
    elif os.path.exists(location):
        return [location]
    else:
        raise InputError(f"no URL list at {location}")
    if input_format:
        files = [f for f in files if f.lower().endswith("." + input_format)]
    else:
        files = [f for f in files if format_of(f) is not None]
    if not files:
        raise InputError(f"no {input_format or 'URL list'} files in {location}"
                         f" (formats: {', '.join(INPUT_FORMATS)})")
    return files


@contextlib.contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
    """A file's bytes as a stream, read as they are consumed."""
    if path.startswith(("http://", "https://")):
        request = urllib.request.Request(path, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - http(s) only, checked above
            yield response
    elif path.startswith("s3://"):
        bucket, key = _s3_parts(path)
        body = _s3_storage(bucket).s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield body
        finally:
            body.close()
    else:
        with open(path, "rb") as fh:
            yield fh


@contextlib.contextmanager
def open_input(path: str, gzipped: bool) -> Iterator[IO[bytes]]:
    with open_binary(path) as raw:
        if gzipped:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield raw


@contextlib.contextmanager
def seekable_copy(path: str, gzipped: bool) -> Iterator[str]:
    """A local, seekable file of the input (Parquet needs its footer first): the file itself when local and not
    gzipped, else a temporary copy streamed to disk (not memory)."""
    if not gzipped and not path.startswith(("s3://", "http://", "https://")):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="url-list-") as tmp:
        local = os.path.join(tmp, "list.parquet")
        with open_input(path, gzipped) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        yield local


# --- reading ---------------------------------------------------------------------------------------------------

def _wanted(spec: InputSpec) -> list[str]:
    return list(dict.fromkeys([spec.url_col, spec.caption_col, spec.language_col, *spec.keep, *spec.optional]))


def _check_columns(names: list[str], spec: InputSpec, path: str) -> None:
    missing = [c for c in (spec.url_col, *spec.keep) if c not in names]
    if missing:
        what = "URL column" if missing[0] == spec.url_col else "column asked to be kept"
        raise InputError(f"{path} has no column {missing[0]!r}, the {what} (columns: {', '.join(names) or 'none'})")


def standard_batch(batch: pa.RecordBatch | pa.Table, spec: InputSpec, path: str) -> pa.RecordBatch:
    """url, caption, language as strings (null when absent), then the kept columns as they are."""
    names = batch.schema.names
    _check_columns(names, spec, path)

    def text(name: str) -> pa.Array:
        if name not in names:
            return pa.nulls(batch.num_rows, pa.string())
        col = batch.column(names.index(name))
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        return col if col.type == pa.string() else col.cast(pa.string())

    arrays = [text(spec.url_col), text(spec.caption_col), text(spec.language_col)]
    out = list(STANDARD)
    for name in spec.keep:
        col = batch.column(names.index(name))
        arrays.append(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
        out.append(name)
    for name in spec.optional:
        if name in names and name not in out:
            arrays.append(text(name))
            out.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=out)


def _csv_header(stream: io.BufferedReader, delimiter: str) -> list[str]:
    """The header's column names, peeked without consuming (pyarrow reads the same bytes next)."""
    head = stream.peek(1 << 20)[: 1 << 20]
    line = head.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    return next(csv.reader([line], delimiter=delimiter), [])


def _read_csv(stream: IO[bytes], spec: InputSpec, path: str, delimiter: str, counts: ReadCounts,
              ) -> Iterator[pa.RecordBatch]:
    buffered = io.BufferedReader(stream, 1 << 20) if not isinstance(stream, io.BufferedReader) else stream  # type: ignore[arg-type]
    names = _csv_header(buffered, delimiter)
    _check_columns(names, spec, path)
    wanted = [c for c in _wanted(spec) if c in names]

    def invalid(row: Any) -> str:
        counts.bad(f"{path} line {row.number}" if row.number else path, row.text or "")
        return "skip"

    # Every column as text: type inference on the first block alone fails later blocks (a uid column of digits
    # that turns hexadecimal); columns kept from a CSV stay strings, as img2dataset's pandas would not guarantee.
    reader = pacsv.open_csv(
        buffered,
        read_options=pacsv.ReadOptions(block_size=1 << 22),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=invalid, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types=dict.fromkeys(wanted, pa.string()),
                                             strings_can_be_null=False, null_values=[""]),
    )
    for batch in reader:
        if batch.num_rows:
            yield standard_batch(batch, spec, path)


def _read_txt(stream: IO[bytes], spec: InputSpec, path: str) -> Iterator[pa.RecordBatch]:
    if spec.keep:
        raise InputError(f"{path}: a txt list has only URLs, no column {spec.keep[0]!r} to keep")
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=None)  # type: ignore[arg-type]
    urls: list[str] = []
    for line in text:
        url = line.strip()
        if url:
            urls.append(url)
        if len(urls) >= BATCH_ROWS:
            yield _txt_batch(urls)
            urls = []
    if urls:
        yield _txt_batch(urls)


def _txt_batch(urls: list[str]) -> pa.RecordBatch:
    n = len(urls)
    return pa.RecordBatch.from_arrays([pa.array(urls, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string())],
                                      names=list(STANDARD))


def _objects_batch(objects: list[dict[str, Any]], spec: InputSpec, path: str) -> pa.RecordBatch:
    wanted = _wanted(spec)
    columns: dict[str, list[Any]] = {c: [o.get(c) for o in objects] for c in wanted}
    present = set().union(*(o.keys() for o in objects)) if objects else set()
    arrays: dict[str, Any] = {}
    for c in wanted:
        if c not in present:
            continue
        values = columns[c]
        if c in (spec.url_col, spec.caption_col, spec.language_col, *spec.optional):
            values = [None if v is None else v if isinstance(v, str) else orjson.dumps(v).decode() for v in values]
        arrays[c] = values
    table = pa.table(arrays) if arrays else pa.table({})
    if spec.url_col not in present:
        raise InputError(f"{path} has no column {spec.url_col!r}, the URL column (keys: "
                         f"{', '.join(sorted(present)) or 'none'})")
    return standard_batch(table, spec, path)


def _read_jsonl(stream: IO[bytes], spec: InputSpec, path: str, counts: ReadCounts) -> Iterator[pa.RecordBatch]:
    objects: list[dict[str, Any]] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            counts.bad(f"{path} line {number}", line.decode("utf-8", "replace"))
            continue
        if not isinstance(obj, dict):
            counts.bad(f"{path} line {number}", "not a JSON object")
            continue
        objects.append(obj)
        if len(objects) >= BATCH_ROWS:
            yield _objects_batch(objects, spec, path)
            objects = []
    if objects:
        yield _objects_batch(objects, spec, path)


def _read_json(stream: IO[bytes], spec: InputSpec, path: str, counts: ReadCounts) -> Iterator[pa.RecordBatch]:
    buffered = io.BufferedReader(stream, 1 << 16) if not isinstance(stream, io.BufferedReader) else stream  # type: ignore[arg-type]
    if not buffered.peek(1 << 12).lstrip().startswith(b"["):
        yield from _read_jsonl(buffered, spec, path, counts)
        return
    try:
        doc = orjson.loads(buffered.read())
    except orjson.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from err
    objects = []
    for i, obj in enumerate(doc):
        if isinstance(obj, dict):
            objects.append(obj)
        else:
            counts.bad(f"{path} item {i}", "not a JSON object")
    for lo in range(0, len(objects), BATCH_ROWS):
        yield _objects_batch(objects[lo:lo + BATCH_ROWS], spec, path)


def _read_parquet(path: str, gzipped: bool, spec: InputSpec) -> Iterator[pa.RecordBatch]:
    with seekable_copy(path, gzipped) as local:
        file = pq.ParquetFile(local)
        names = file.schema_arrow.names
        _check_columns(names, spec, path)
        wanted = [c for c in _wanted(spec) if c in names]
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            if batch.num_rows:
                yield standard_batch(batch, spec, path)


def read_file(path: str, input_format: str, spec: InputSpec, counts: ReadCounts) -> Iterator[pa.RecordBatch]:
    """One file's rows as standard batches."""
    check_format(input_format)
    base, gzipped = input_format.removesuffix(".gz"), input_format.endswith(".gz")
    if base == "parquet":
        yield from _read_parquet(path, gzipped, spec)
        return
    with open_input(path, gzipped) as stream:
        if base == "txt":
            yield from _read_txt(stream, spec, path)
        elif base in ("csv", "tsv"):
            yield from _read_csv(stream, spec, path, "," if base == "csv" else "\t", counts)
        elif base == "jsonl":
            yield from _read_jsonl(stream, spec, path, counts)
        else:
            yield from _read_json(stream, spec, path, counts)


def iter_batches(spec: InputSpec, counts: ReadCounts | None = None) -> Iterator[pa.RecordBatch]:
    """Every row of a URL list (a file or a folder) as standard batches, in file order then row order. Kept
    columns take the first file's type; a later file whose column does not cast to it is an error naming both."""
    counts = counts if counts is not None else ReadCounts()
    schema: pa.Schema | None = None
    for path in list_inputs(spec.location, spec.input_format):
        fmt = spec.input_format or format_of(path)
        if fmt is None:
            raise InputError(f"cannot tell the format of {path}: pass input_format ({', '.join(INPUT_FORMATS)})")
        counts.files += 1
        for batch in read_file(path, fmt, spec, counts):
            if schema is None:
                schema = batch.schema
            elif batch.schema != schema:
                batch = _conform(batch, schema, path)
            counts.rows += batch.num_rows
            yield batch


def _conform(batch: pa.RecordBatch, schema: pa.Schema, path: str) -> pa.RecordBatch:
    arrays = []
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        want = schema.field(name).type
        if col.type == want:
            arrays.append(col)
            continue
        try:
            arrays.append(col.cast(want))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise InputError(f"{path}: column {name!r} is {col.type}, the list's first file has {want}: {err}") from err
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def read_table(spec: InputSpec, counts: ReadCounts | None = None) -> pa.Table:
    """The whole list's standard columns as one Arrow table (the download plans over every row)."""
    counts = counts if counts is not None else ReadCounts()
    batches = list(iter_batches(spec, counts))
    return pa.Table.from_batches(batches) if batches else empty_table(spec)


def empty_table(spec: InputSpec) -> pa.Table:
    """What `read_table` gives for a list without rows: the standard and kept columns, as strings."""
    return pa.table({n: pa.array([], pa.string()) for n in [*STANDARD, *spec.keep]})

