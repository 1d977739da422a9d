"""Reading a URL list (any format `inputs.py` reads): the input columns, and a fingerprint of any slice of it.

A download from a URL list (`distributor.run` given a location: the CLI's download commands, the img2dataset
interface) reads it into a local Arrow IPC file as it streams (`read_inputs(..., spill=...)`) and maps it: the
planner fingerprints each shard's rows as they pass, and every process then reads just the rows it works on from
the map, so that the list's columns are never held in memory whatever its length (benchmarks/bench_inputs.py).
The graph's download is given its bucket's pairs as a table (`pairs_inputs`), a bucket at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.download.inputs import InputSpec, ReadCounts, empty_table, iter_batches, read_table
from laion_assets.core.settings import DownloadSettings

if TYPE_CHECKING:
    import polars as pl

# The columns the download itself reads; any other column of the input table is a kept one.
OWN_COLUMNS = ("url", "caption", "language", "page_url", "robots")


@dataclass(frozen=True)
class InputColumns:
    """Which columns of the URL list hold what; caption and language may be missing (read as empty), and so may
    the page's URL and robots directives (the crawl's `page_url` and `robots`: then no page opt-out applies)."""

    url: str = "url"
    caption: str = "caption"
    language: str = "language"
    page_url: str = "page_url"
    robots: str = "robots"
    input_format: str = ""  # empty: from the file names (a Parquet file by default)
    keep: tuple[str, ...] = ()  # other columns carried to every sample's row (save_additional_columns, ...)


@dataclass(frozen=True)
class Inputs:
    """The input columns as Arrow (compact); Python strings are made one shard at a time."""

    table: pa.Table  # url, caption, language, [page_url, robots], then the kept columns
    malformed: int = 0  # input lines skipped as malformed (counted, never silently)
    path: str = ""  # the Arrow IPC file the table maps, when read with a spill file
    # The fingerprints of rows [i * chunk_rows, (i + 1) * chunk_rows), taken while spilling (0: none taken).
    chunk_rows: int = 0
    fingerprints: tuple[str, ...] = ()

    @property
    def extra(self) -> tuple[str, ...]:
        """The kept columns' names."""
        return tuple(c for c in self.table.column_names if c not in OWN_COLUMNS)

    def extras(self, lo: int, hi: int) -> list[dict]:
        """The kept columns of rows [lo, hi), one dict per row (empty dicts when none are kept)."""
        if not self.extra:
            return [{} for _ in range(hi - lo)]
        return self.table.slice(lo, hi - lo).select(list(self.extra)).to_pylist()

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def rows(self, lo: int, hi: int) -> list[tuple[str | None, str | None, str | None]]:
        part = self.table.slice(lo, hi - lo)
        return list(zip(*(part[c].to_pylist() for c in ("url", "caption", "language")), strict=True))

    def opted_out_pages(self) -> dict[int, tuple[str, str]]:
        """Row -> (page URL, robots directives) of the rows whose page's directives mention noai or noimageai
        (a handful: found without making a Python string per row)."""
        if "robots" not in self.table.column_names:
            return {}
        import pyarrow.compute as pc

        hits = pc.indices_nonzero(pc.fill_null(pc.match_substring_regex(self.table["robots"], "noai|noimageai"),
                                               False)).to_pylist()
        pages, robots = self.table["page_url"].take(hits).to_pylist(), self.table["robots"].take(hits).to_pylist()
        return {i: (p or "", r) for i, p, r in zip(hits, pages, robots, strict=True)}

    def save(self, path: str) -> None:
        """For worker processes: an Arrow IPC file they map instead of re-reading the input. Written with pyarrow.ipc
        rather than feather, whose writer imports pandas (a quarter of a second of every download's start)."""
        table = plain(self.table)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    @classmethod
    def load(cls, path: str) -> Inputs:
        # The map stays open: the table's buffers are views of it.
        return cls(pa.ipc.open_file(pa.memory_map(path)).read_all())

    def fingerprint(self, lo: int, hi: int) -> str:
        """A hash of rows [lo, hi): a shard made from other rows (an edited or reordered input) never matches."""
        n = self.chunk_rows
        if n and lo % n == 0 and hi == min(lo + n, self.num_rows) and lo // n < len(self.fingerprints):
            return self.fingerprints[lo // n]
        return fingerprint(self.table.slice(lo, hi - lo))


def plain(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas categories in a Parquet list) as their values: an Arrow IPC file holds one
    dictionary per column, and each file or batch of a list may bring its own."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, pa.field(f.name, f.type.value_type, f.nullable, f.metadata),
                                     table.column(i).cast(f.type.value_type))
    return table


def fingerprint(table: pa.Table) -> str:
    """`Inputs.fingerprint` of a table of input columns."""
    inputs = Inputs(table)
    digest = hashlib.blake2b(digest_size=16)
    for row in inputs.rows(0, table.num_rows):
        for value in row:
            # 0x1f separates values, 0x00 marks a null, so ("a", None) and ("a", "") differ.
            digest.update(b"\x00" if value is None else value.encode("utf-8", "surrogatepass"))
            digest.update(b"\x1f")
    if inputs.extra:  # only then, so that the fingerprints of lists without kept columns stay as they were
        import orjson

        digest.update(repr(pa.schema([table.schema.field(c) for c in inputs.extra])).encode())
        for extra in inputs.extras(0, table.num_rows):
            digest.update(orjson.dumps(extra, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
                                       default=str))
    return digest.hexdigest()


def open_url_list(path: str, url_col: str) -> pq.ParquetFile:
    """A Parquet URL list, opened (footer only); a clear error when the URL column is missing."""
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if url_col not in names:
        raise ValueError(f"{path} has no column {url_col!r} (columns: {', '.join(names)})")
    return file


def inputs_of(table: pa.Table, columns: InputColumns | None = None) -> Inputs:
    """The input columns of a table; missing caption/language columns read as empty."""
    columns = columns or InputColumns()
    if columns.url not in table.column_names:
        raise ValueError(f"the URL list has no column {columns.url!r} (columns: {', '.join(table.column_names)})")

    def column(name: str) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(table.num_rows, pa.string())
        return table[name].cast(pa.string())

    missing = [c for c in columns.keep if c not in table.column_names]
    if missing:
        raise ValueError(f"the URL list has no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    wanted = {"url": column(columns.url), "caption": column(columns.caption), "language": column(columns.language)}
    if columns.robots in table.column_names:
        wanted |= {"page_url": column(columns.page_url), "robots": column(columns.robots)}
    return Inputs(pa.table({**wanted, **{c: table[c] for c in columns.keep}}))


def read_inputs(path: str, columns: InputColumns | None = None, spill: str = "", chunk_rows: int = 0) -> Inputs:
    """The input columns of a URL list: a file or a folder in any format `inputs.py` reads (streamed, only those
    columns kept). Malformed lines are counted in `Inputs.malformed`.

    With `spill` (a local path), the columns go to that Arrow IPC file as they are read and the Inputs map it, so
    that at most a batch and a shard of rows are in memory whatever the list's length; `chunk_rows` (the download's
    samples_per_shard) also takes the fingerprint of every `chunk_rows` rows on the way (the plan's, which then
    reads nothing back)."""
    columns = columns or InputColumns()
    counts = ReadCounts()
    spec = InputSpec(path, columns.input_format, columns.url, columns.caption, columns.language, columns.keep,
                     optional=(columns.page_url, columns.robots))
    read = dataclasses.replace(columns, url="url", caption="caption", language="language")
    if not spill:
        table = read_table(spec, counts)  # url, caption, language under these names, the others under their own
        return dataclasses.replace(inputs_of(table, read), malformed=counts.malformed)
    fingerprints: list[str] = []
    writer: pa.ipc.RecordBatchFileWriter | None = None
    with pa.OSFile(spill, "wb") as sink:

        def write(part: pa.Table) -> None:
            nonlocal writer
            if chunk_rows:  # of the columns as read (a category column's type is in the fingerprint, as before)
                fingerprints.append(fingerprint(part))
            part = plain(part).combine_chunks()  # one record batch a chunk: a shard's rows lie together
            if writer is None:
                writer = pa.ipc.new_file(sink, part.schema)
            writer.write_table(part)

        pending: list[pa.Table] = []
        held = 0
        for batch in iter_batches(spec, counts):
            part = inputs_of(pa.Table.from_batches([batch]), read).table
            if not chunk_rows:
                write(part)
                continue
            pending.append(part)
            held += part.num_rows
            while held >= chunk_rows:  # whole chunks out, the rest held for the next batch
                joined = pa.concat_tables(pending)
                write(joined.slice(0, chunk_rows))
                pending, held = [joined.slice(chunk_rows)], held - chunk_rows
        if held:  # the last chunk, short
            write(pa.concat_tables(pending))
        if writer is None:  # an empty list: the file still has the columns
            writer = pa.ipc.new_file(sink, plain(inputs_of(empty_table(spec), read).table).schema)
        writer.close()
    mapped = Inputs.load(spill)
    return dataclasses.replace(mapped, malformed=counts.malformed, path=spill, chunk_rows=chunk_rows,
                               fingerprints=tuple(fingerprints))


# What the download reads of a crawl's unique pairs (the unique_pairs asset's columns).
PAIR_COLUMNS = InputColumns(url="url", caption="text", language="language", page_url="page_url", robots="robots")


def pairs_inputs(pairs: pl.LazyFrame, settings: DownloadSettings, id_col: str = "") -> tuple[Inputs, DownloadSettings]:
    """A bucket's unique pairs as a download's inputs, and the settings to download them with. `id_col`: a URL
    list's id column (`lists add --id-col`, e.g. DataComp's uid), which its pairs carry as `record_id`: kept
    under its own name in every row of the shards (their .parquet and each sample's .json), so that the rows,
    filtered_metadata and the release join back to the list."""
    c = PAIR_COLUMNS
    names = [c.url, c.caption, c.language, c.page_url, c.robots]
    if not id_col:
        return inputs_of(pairs.select(names).collect().to_arrow(), c), settings
    import polars as pl

    table = pairs.select([*names, pl.col("record_id").alias(id_col)]).collect().to_arrow()
    settings = dataclasses.replace(settings, save_additional_columns=(*settings.save_additional_columns, id_col))
    return inputs_of(table, dataclasses.replace(c, keep=(id_col,))), settings
