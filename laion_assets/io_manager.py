"""The IO manager: every asset's output goes to the storage root (local or S3), at the key `core/paths.py` gives
it, and reaches downstream assets as an input.

Tables (pyarrow, polars, a polars LazyFrame, which is streamed to the file, or a finished local Parquet file, which
is copied as it is) are stored as Parquet; records
(the small manifests of bulk-file stages: which shards, which embedding files, how many rows) as JSON. A stage
that writes its manifest itself as its completion marker (a download's `_manifest.json`) is not written twice:
the IO manager only writes a record whose bytes differ from what is stored. Inputs are loaded as the asset's
parameter annotation asks (`pa.Table`, `pl.DataFrame`, `pl.LazyFrame`, a record class, or `dict[str, ...]` of
those for an input that spans several partitions, keyed by partition key).
"""

from __future__ import annotations

import os
import typing
from typing import Any

import dagster as dg
import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.paths import Layout
from laion_assets.core.records import JsonRecord
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


def require_partitions(store: Storage, asset: str, keys: dict[str, str]) -> None:
    """Fail naming the partitions of `asset` whose stored output is missing, before anything is read or written."""
    missing = sorted(p for p, key in keys.items() if not store.exists(key))
    if missing:
        raise MissingPartitionsError(f"{asset}: {len(missing)} upstream partition(s) not materialized: "
                                     f"{', '.join(missing[:10])}")


class StorageIOManager(dg.ConfigurableIOManager):
    """Stores outputs under the storage root at the keys of `core/paths.py`: Parquet tables and JSON records."""

    storage: StorageResource
    chunks: int = Layout.chunks
    buckets: int = Layout.buckets

    @property
    def layout(self) -> Layout:
        return Layout(self.chunks, self.buckets)

    def _key(self, asset: str, dims: dict[str, str]) -> str:
        return paths.asset_output(asset, dims, self.layout)

    # --- outputs ------------------------------------------------------------------------------------------
    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        store = self.storage.get()
        asset = context.asset_key.path[-1]
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            # A single-run backfill of many partitions returns {partition key: value}.
            for partition, value in obj.items():
                self._write(store, self._key(asset, partition_dims(partition, partitions_def)), value, None)
            return
        key = self._key(asset, partition_dims(context.asset_partition_key if partitions_def else None, partitions_def))
        self._write(store, key, obj, context)

    def _write(self, store: Storage, key: str, obj: Any, context: dg.OutputContext | None) -> None:
        import polars as pl

        if isinstance(obj, JsonRecord):
            data = obj.to_json()
            if not (store.exists(key) and store.read_bytes(key) == data):
                store.write_bytes(key, data)
            if context is not None:
                context.add_output_metadata({"dagster/uri": store.uri(key)})
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
        asset = context.asset_key.path[-1]
        wanted = context.dagster_type.typing_type
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        if typing.get_origin(wanted) is dict:
            _, inner = typing.get_args(wanted)
            require_partitions(store, asset, {str(p): self._key(asset, partition_dims(p, partitions_def))
                                              for p in context.asset_partition_keys})
            return {str(p): self._read(store, self._key(asset, partition_dims(p, partitions_def)), inner)
                    for p in context.asset_partition_keys}
        partition = context.asset_partition_key if partitions_def else None
        return self._read(store, self._key(asset, partition_dims(partition, partitions_def)), wanted)

    def _read(self, store: Storage, key: str, wanted: Any) -> Any:
        import polars as pl

        if isinstance(wanted, type) and issubclass(wanted, JsonRecord):
            return wanted.from_json(store.read_bytes(key))
        if wanted is pl.LazyFrame:
            return pl.scan_parquet(store.scratch_copies([key])[0])
        table = store.read_parquet(key)
        return pl.from_arrow(table) if wanted is pl.DataFrame else table
