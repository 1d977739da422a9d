"""The shard writer's rows table: built without pandas, the same table and Parquet bytes as from_pylist."""

from __future__ import annotations

import datetime
import io
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core.download.writer import ROW_SCHEMA, new_row, rows_table

NASTY = ["", "plain", "é ü ß 中文 😀", "nul \x00 inside", "quote \" and \\ backslash", "tab\tnew\nline\r",
         "\u2028\u2029 separators", "\x7f\x01 control", "ﬀ" * 300]


def _rows() -> list[dict]:
    rows = []
    for i, text in enumerate(NASTY * 3):
        row = new_row(f"{i:09d}", f"http://127.0.0.1:8080/{i}.jpg?q={text[:5]}", text if i % 4 else None,
                      "en" if i % 2 else None)
        if i % 3 == 0:
            row.update(status="success", http_status=200, width=256, height=256, original_width=2**31 - 1,
                       original_height=-(2**31), sha256="ab" * 32, phash="cd" * 8, bytes_downloaded=2**62,
                       attempts=3, runs=2, error_message=None, final_url=row["url"])
        elif i % 3 == 1:
            row.update(status="failed_to_download", error_message=f"HTTP 503 {text}", http_status=503)
        rows.append(row)
    return rows


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def test_rows_table_is_from_pylist_to_the_byte():
    rows = _rows()
    expected = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    table = rows_table(rows, ROW_SCHEMA)
    assert table.equals(expected) and table.schema == expected.schema
    assert all(c.num_chunks == 1 for c in table.columns)
    assert _parquet(table) == _parquet(expected)
    extra = pa.schema([*ROW_SCHEMA, ("uid", pa.string()), ("n", pa.int64())])
    wide = [{**r, "uid": f"u{i}", "n": i if i % 2 else None, "ignored": 1.5} for i, r in enumerate(rows)]
    assert _parquet(rows_table(wide, extra)) == _parquet(pa.Table.from_pylist(wide, schema=extra))
    assert rows_table([], ROW_SCHEMA).equals(pa.Table.from_pylist([], schema=ROW_SCHEMA))


@pytest.mark.parametrize("value", [1.5, True, datetime.datetime(2024, 1, 1), "\ud800", [1]])
def test_what_json_cannot_carry_goes_through_from_pylist(value):
    """A value of another type (or a lone surrogate) in a string column: whatever from_pylist does, here too."""
    rows = [{**new_row("0", "u", "c", None), "caption": value}]
    try:
        expected = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    except Exception as err:  # noqa: BLE001 - the same exception is what is asserted
        with pytest.raises(type(err)):
            rows_table(rows, ROW_SCHEMA)
    else:
        assert rows_table(rows, ROW_SCHEMA).equals(expected)


def test_rows_table_does_not_import_pandas():
    code = ("import sys; from laion_assets.core.download.writer import ROW_SCHEMA, new_row, rows_table;"
            "rows_table([new_row('0', 'u', 'c', None)], ROW_SCHEMA); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
