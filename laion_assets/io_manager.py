"""The IO manager: every asset's output goes to the storage root (local or S3), at a key that comes from the asset
key and the partition alone (`paths.output_key`), and reaches downstream assets as an input.

Tables (pyarrow, polars, a polars LazyFrame, which is streamed to the file, or a finished local Parquet file, which
is copied as it is) are stored as Parquet; records (the small manifests of bulk-file stages: which shards, which
embedding files, how many rows) as JSON. A record that its stage committed itself as its completion marker (a
download's `_manifest.json`: `JsonRecord.committed_at`) is checked against what is stored there, not written
again: the IO manager's key then holds a pointer to it. Inputs are loaded as the asset's parameter annotation asks
(`pa.Table`, `pl.DataFrame`, `pl.LazyFrame`, a record class, or `dict[str, ...]` of those for an input that spans
several partitions, keyed by the upstream's own dimension within the crawl: the chunk or bucket key).
"""

from __future__ import annotations

import os
import typing
from typing import Any

import dagster as dg
import orjson
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.paths import Layout
from laion_assets.core.records import POINTER, JsonRecord
from laion_assets.core.storage import LocalParquet, Storage
from laion_assets.resources import StorageResource


def partition_dims(key: str | dg.MultiPartitionKey | None, partitions_def: Any) -> dict[str, str]:
    """A partition key as {dimension: value}; a single-dimension key is the crawl."""
    if key is None:
        return {}
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        if not isinstance(key, dg.MultiPartitionKey):
            key = partitions_def.get_partition_key_from_str(key)
        return dict(key.keys_by_dimension)
    return {"crawl": str(key)}


def table_metadata(store: Storage, key: str, schema: pa.Schema, rows: int) -> dict[str, Any]:
    """What the UI shows of a stored table: where, rows, bytes, columns."""
    columns = [dg.TableColumn(f.name, str(f.type)) for f in schema]
    return {"dagster/uri": store.uri(key), "dagster/row_count": rows, "bytes": store.size(key),
            "dagster/column_schema": dg.TableSchema(columns=columns)}


class MissingPartitionsError(dg.Failure):
    """An input spanning several partitions of which some were never materialized."""


class CommittedRecordMismatch(RuntimeError):
    """A stage returned a record other than the one it committed: a bug, never something to paper over."""


def _suffix(obj_or_type: Any) -> str:
    kind = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    return ".json" if isinstance(kind, type) and issubclass(kind, JsonRecord) else ".parquet"


def stored_key(asset: dg.AssetKey, dims: dict[str, str], layout: Layout, kind: type = pa.Table) -> str:
    """Where this IO manager keeps an asset's output of `kind` (a table or a record class) for a partition: for the
    cross-crawl dedups, which read their own earlier crawls' outputs, and for an op rereading its own."""
    return paths.output_key(asset.path, dims, layout, _suffix(kind))


def _target(store: Storage, key: str) -> str:
    """The key that holds a record: itself, or the committed record a pointer names."""
    if not key.endswith(".json") or not store.exists(key):
        return key
    doc = orjson.loads(store.read_bytes(key))
    return doc[POINTER] if isinstance(doc, dict) and set(doc) == {POINTER} else key


class StorageIOManager(dg.ConfigurableIOManager):
    """Stores outputs under the storage root at keys made from the asset key and partition: Parquet tables and JSON
    records."""

    storage: StorageResource
    chunks: int = Layout.chunks
    buckets: int = Layout.buckets

    @property
    def layout(self) -> Layout:
        return Layout(self.chunks, self.buckets)

    def key(self, asset: dg.AssetKey, dims: dict[str, str], suffix: str) -> str:
        return paths.output_key(asset.path, dims, self.layout, suffix)

    # --- outputs ------------------------------------------------------------------------------------------
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        store = self.storage.get()
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            # A single-run backfill of many partitions returns {partition key: value}.
            for partition, value in obj.items():
                dims = partition_dims(partition, partitions_def)
                self._write(store, self.key(context.asset_key, dims, _suffix(value)), value, None)
            return
        dims = partition_dims(context.asset_partition_key if partitions_def else None, partitions_def)
        self._write(store, self.key(context.asset_key, dims, _suffix(obj)), obj, context)

    def _write(self, store: Storage, key: str, obj: Any, context: dg.OutputContext | None) -> None:
        import polars as pl

        if isinstance(obj, JsonRecord):
            data, committed = obj.to_json(), obj.committed_at()
            if committed is None:
                store.write_bytes(key, data)
            else:
                if store.read_bytes(committed) != data:
                    raise CommittedRecordMismatch(f"{store.uri(committed)} is not the record its stage returned")
                store.write_bytes(key, orjson.dumps({POINTER: committed}))
            if context is not None:
                context.add_output_metadata({"dagster/uri": store.uri(committed or key)})
            return
        if isinstance(obj, LocalParquet):
            import pyarrow.parquet as pq

            file = pq.ParquetFile(obj.path)
            schema, rows = file.schema_arrow, file.metadata.num_rows
            store.put_file(obj.path, key)
        elif isinstance(obj, pl.LazyFrame):
            import pyarrow.parquet as pq

            with store.staging_dir() as stage:
                local = os.path.join(stage, "table.parquet")
                obj.sink_parquet(local, compression="zstd")  # streamed: the table need not fit in memory
                file = pq.ParquetFile(local)
                schema, rows = file.schema_arrow, file.metadata.num_rows
                store.put_file(local, key)
        else:
            table = obj.to_arrow() if isinstance(obj, pl.DataFrame) else obj
            if not isinstance(table, pa.Table):
                raise TypeError(f"{key}: the IO manager stores Arrow or polars tables and JSON records, not "
                                f"{type(obj).__name__}")
            store.write_parquet(key, table)
            schema, rows = table.schema, table.num_rows
        if context is not None:
            context.add_output_metadata(table_metadata(store, key, schema, rows))

    # --- inputs -------------------------------------------------------------------------------------------
    def load_input(self, context: dg.InputContext) -> Any:
        store = self.storage.get()
        wanted = context.dagster_type.typing_type
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        if typing.get_origin(wanted) is dict:
            _, inner = typing.get_args(wanted)
            keys = {}
            for p in context.asset_partition_keys:
                dims = partition_dims(p, partitions_def)
                # Every fan-in of the graph stays within one crawl: the chunk or bucket names the part.
                name = "/".join(v for d, v in sorted(dims.items()) if d != "crawl") or dims.get("crawl", str(p))
                if name in keys:
                    raise ValueError(f"{context.asset_key.to_user_string()}: partitions {p} and another are both "
                                     f"{name!r}: a dict input spans one crawl")
                keys[name] = self.key(context.asset_key, dims, _suffix(inner))
            # A pointer whose record a failed rerun removed (it deletes its marker first) is missing too.
            missing = sorted(p for p, key in keys.items() if not store.exists(_target(store, key)))
            if missing:
                raise MissingPartitionsError(f"{context.asset_key.to_user_string()}: {len(missing)} upstream "
                                             f"partition(s) not materialized: {', '.join(missing[:10])}")
            return {p: self._read(store, key, inner) for p, key in keys.items()}
        partition = context.asset_partition_key if partitions_def else None
        return self._read(store, self.key(context.asset_key, partition_dims(partition, partitions_def),
                                          _suffix(wanted)), wanted)

    def _read(self, store: Storage, key: str, wanted: Any) -> Any:
        import polars as pl

        if isinstance(wanted, type) and issubclass(wanted, JsonRecord):
            return wanted.from_json(store.read_bytes(_target(store, key)))
        if wanted is pl.LazyFrame:
            return pl.scan_parquet(store.scratch_copies([key])[0])
        table = store.read_parquet(key)
        return pl.from_arrow(table) if wanted is pl.DataFrame else table
