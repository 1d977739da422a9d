"""URL lists in every format img2dataset reads, read to the same rows; bad input named, counted or refused."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core.download import inputs as inputs_module
from laion_assets.core.download.inputs import INPUT_FORMATS, InputError, InputSpec, ReadCounts, read_table
from laion_assets.core.download.reader import InputColumns, inputs_of, read_inputs

ROWS = [{"url": f"http://example.com/{i}.jpg", "caption": f"a caption, with \"quotes\" {i}", "uid": f"{i:032x}"}
        for i in range(7)]


def write_list(folder: Path, fmt: str, rows: list[dict] = ROWS) -> Path:
    base = fmt.removesuffix(".gz")
    path = folder / f"list.{fmt}"
    if base == "parquet":
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue().to_pybytes()
    elif base == "txt":
        data = "".join(r["url"] + "\n" for r in rows).encode()
    elif base in ("csv", "tsv"):
        lines: list[str] = []

        class Sink:
            def write(self, s: str) -> None:
                lines.append(s)

        writer = csv.DictWriter(Sink(), fieldnames=list(rows[0]), delimiter="," if base == "csv" else "\t",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = "".join(lines).encode()
    elif base == "json":
        data = json.dumps(rows).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_format_reads_to_the_same_rows(tmp_path, fmt):
    path = write_list(tmp_path, fmt)
    keep = () if fmt.startswith("txt") else ("uid",)
    counts = ReadCounts()
    table = read_table(InputSpec(str(path), keep=keep), counts)  # the format from the file name
    expected = [{"url": r["url"], "caption": None if fmt.startswith("txt") else r["caption"], "language": None,
                 **({"uid": r["uid"]} if keep else {})} for r in ROWS]
    assert table.to_pylist() == expected
    assert (counts.files, counts.rows, counts.malformed) == (1, len(ROWS), 0)
    # ... and the same named explicitly, as img2dataset's input_format
    assert read_table(InputSpec(str(path), fmt, keep=keep)).to_pylist() == expected


def test_a_folder_of_files_is_read_in_name_order(tmp_path):
    for i, part in enumerate((ROWS[:3], ROWS[3:])):
        sub = tmp_path / f"p{i}"
        sub.mkdir()
        write_list(sub, "tsv.gz", part).rename(tmp_path / f"part-{i}.tsv.gz")
    (tmp_path / "README.md").write_text("not a list")
    inputs = read_inputs(str(tmp_path), InputColumns(input_format="tsv.gz", keep=("uid",)))
    assert inputs.table["uid"].to_pylist() == [r["uid"] for r in ROWS]
    assert inputs.extras(5, 7) == [{"uid": ROWS[5]["uid"]}, {"uid": ROWS[6]["uid"]}]


def test_https_and_s3_lists(tmp_path, loopback, s3_server, monkeypatch):
    path = write_list(tmp_path, "jsonl.gz")
    loopback.static("/lists/list.jsonl.gz", path.read_bytes())
    table = read_table(InputSpec(f"{loopback.base}/lists/list.jsonl.gz", keep=("uid",)))
    assert table["uid"].to_pylist() == [r["uid"] for r in ROWS]
    for name, value in (("AWS_ENDPOINT_URL", s3_server), ("AWS_ACCESS_KEY_ID", "t"), ("AWS_SECRET_ACCESS_KEY", "t"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="lists")
    client.put_object(Bucket="lists", Key="cc/part-0.parquet", Body=write_list(tmp_path, "parquet").read_bytes())
    client.put_object(Bucket="lists", Key="cc/part-1.parquet", Body=write_list(tmp_path, "parquet").read_bytes())
    table = read_table(InputSpec("s3://lists/cc", "parquet", keep=("uid",)))
    assert table.num_rows == 2 * len(ROWS)


def test_malformed_lines_are_counted_and_the_rest_kept(tmp_path):
    tsv = tmp_path / "l.tsv"
    tsv.write_text("url\tcaption\nhttp://a/1.jpg\tone\nthree\tfields\there\nhttp://a/2.jpg\ttwo\n")
    counts = ReadCounts()
    assert read_table(InputSpec(str(tsv)), counts)["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert counts.malformed == 1 and "three" in counts.examples[0]
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text('{"url": "http://a/1.jpg"}\n{not json\n[1, 2]\n\n{"url": "http://a/2.jpg"}\n')
    inputs = read_inputs(str(jsonl))
    assert inputs.table["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"] and inputs.malformed == 2


def test_a_missing_column_is_named(tmp_path):
    path = write_list(tmp_path, "csv")
    with pytest.raises(InputError, match=r"no column 'link', the URL column \(columns: url, caption, uid\)"):
        read_table(InputSpec(str(path), url_col="link"))
    with pytest.raises(InputError, match="no column 'face_bboxes', the column asked to be kept"):
        read_table(InputSpec(str(path), keep=("face_bboxes",)))


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown input format 'xml'"):
        InputSpec(str(tmp_path), "xml")
    (tmp_path / "list.xml").write_text("<urls/>")
    with pytest.raises(InputError, match="no URL list files"):
        read_table(InputSpec(str(tmp_path)))


@pytest.mark.parametrize("chunk_rows", [0, 4, 7, 100])
def test_a_spilled_list_is_the_same_rows_mapped_from_disk(tmp_path, monkeypatch, chunk_rows):
    """What the download does: the columns streamed into an Arrow file as they are read (batches of 7 rows here,
    rechunked to the shards' size) and mapped from it, with each shard's fingerprint taken on the way."""
    monkeypatch.setattr(inputs_module, "BATCH_ROWS", 7)
    rows = [{"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "uid": f"{i:032x}"} for i in range(30)]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    columns = InputColumns(keep=("uid",))
    memory = read_inputs(str(path), columns)
    allocated = pa.total_allocated_bytes()
    spilled = read_inputs(str(path), columns, spill=str(tmp_path / "inputs.arrow"), chunk_rows=chunk_rows)
    assert pa.total_allocated_bytes() - allocated < memory.table.nbytes / 4  # mapped, not held
    assert spilled.table.equals(memory.table) and spilled.malformed == memory.malformed == 1
    assert spilled.path == str(tmp_path / "inputs.arrow")
    assert len(spilled.fingerprints) == (-(-30 // chunk_rows) if chunk_rows else 0)
    for lo in range(0, 30, chunk_rows or 5):
        hi = min(lo + (chunk_rows or 5), 30)
        assert spilled.fingerprint(lo, hi) == memory.fingerprint(lo, hi)
    assert spilled.fingerprint(3, 9) == memory.fingerprint(3, 9)  # not a chunk: computed from the rows


def test_an_empty_list_spills_to_an_empty_file(tmp_path):
    path = tmp_path / "l.tsv"
    path.write_text("url\tcaption\n")
    spilled = read_inputs(str(path), spill=str(tmp_path / "inputs.arrow"), chunk_rows=10)
    assert spilled.num_rows == 0 and spilled.table.column_names == read_inputs(str(path)).table.column_names


def test_fingerprints_are_those_existing_downloads_were_planned_with():
    """A shard is skipped on resume only if its fingerprint matches its marker's: these values are the ones the
    download wrote before its input was spilled (taken from that code), so existing downloads keep their shards."""
    t = pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(5)], "caption": ["a", None, "", "d\u00e9", "e"],
                  "language": ["en", None, "fr", "", "de"], "uid": [f"{i:032x}" for i in range(5)],
                  "n": [1, 2, None, 4, 5]})
    own = inputs_of(t.select(["url", "caption", "language"]))
    kept = inputs_of(t, InputColumns(keep=("uid", "n")))
    assert own.fingerprint(0, 5) == "327ce11336f1ecffd4314c1a91bcc6b0"
    assert own.fingerprint(1, 3) == "89a019480286ddbb988f14fab64756ea"
    assert kept.fingerprint(0, 5) == "48a04af2dd0f7e8e9c5290a7cca6ccbb"


def test_category_columns_of_several_files_spill(tmp_path):
    """Each Parquet file of a list may bring its own dictionary for a category column; the spilled file holds the
    values (an Arrow IPC file has one dictionary a column), and the shards' fingerprints are those of the columns as
    read."""
    for i, cats in enumerate((["a", "b", "a"], ["c", "c", "d"], ["b", "e", "a"])):
        urls = [f"http://example.com/{i}-{j}.jpg" for j in range(3)]
        pq.write_table(pa.table({"url": urls, "cat": pa.array(cats).dictionary_encode()}), tmp_path / f"p{i}.parquet")
    columns = InputColumns(keep=("cat",))
    memory = read_inputs(str(tmp_path), columns)
    spilled = read_inputs(str(tmp_path), columns, spill=str(tmp_path / "inputs.arrow"), chunk_rows=4)
    assert spilled.table["cat"].to_pylist() == ["a", "b", "a", "c", "c", "d", "b", "e", "a"]
    assert spilled.table.schema.field("cat").type == pa.string()
    assert [spilled.fingerprint(lo, min(lo + 4, 9)) for lo in (0, 4, 8)] == [memory.fingerprint(lo, min(lo + 4, 9))
                                                                            for lo in (0, 4, 8)]
    batches = pa.ipc.open_file(str(tmp_path / "inputs.arrow"))
    assert [batches.get_batch(i).num_rows for i in range(batches.num_record_batches)] == [4, 4, 1]
