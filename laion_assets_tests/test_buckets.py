"""The bucket shuffle and the dedup: every pair in exactly one bucket, output independent of run order."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from laion_assets.core import buckets
from laion_assets.core.candidates import SCHEMA, extract_chunk
from laion_assets.core.storage import Storage
from laion_assets.core.wat import SourceSettings, build_manifest, chunk_slices, read_listing

CRAWL = "CC-MAIN-2099-01"


def tmp_mirror_of(realdata: Path) -> Path:
    """A read-only view of the real listing laid out as a mirror (symlink; nothing is copied)."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    (root / "crawl-data/CC-MAIN-2023-50").mkdir(parents=True)
    (root / "crawl-data/CC-MAIN-2023-50/wat.paths.gz").symlink_to(realdata / "CC-MAIN-2023-50.wat.paths.gz")
    return root


def test_bucket_writer_puts_each_row_in_its_hash_bucket(tmp_path, realdata):
    from laion_assets.core.candidates import ExtractCounts, PairExtractor

    table = PairExtractor().extract_file(str(realdata / "CC-MAIN-2016-40-00000.first501.warc.wat.gz"), "w",
                                         "c", ExtractCounts())
    writer = buckets.BucketWriter(str(tmp_path), 7, SCHEMA)
    writer.write(table.slice(0, 300))
    writer.write(table.slice(300))
    files = writer.close()
    assert len(files) == 7 and all(os.path.exists(f) for f in files)
    seen = []
    for b, f in enumerate(files):
        urls = pq.read_table(f)["url"].to_pylist()
        assert all(xxhash.xxh3_64_intdigest(u.encode()) % 7 == b for u in urls)
        seen += urls
    assert sorted(seen) == sorted(table["url"].to_pylist())  # nothing lost, nothing duplicated


def test_manifest_chunks_a_real_listing(realdata):
    paths = read_listing("CC-MAIN-2023-50", SourceSettings(base=str(tmp_mirror_of(realdata))))
    assert len(paths) == 90_000
    slices = chunk_slices(len(paths), 512)
    assert slices[0][0] == 0 and slices[-1][1] == 90_000
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
    assert {hi - lo for lo, hi in slices} <= {175, 176}
    manifest = build_manifest(paths, 512, lambda c: buckets.chunk_key(c, 512))
    assert manifest.num_rows == 90_000 and manifest["path"].to_pylist() == paths
    assert manifest["chunk"][0].as_py() == "0000" and manifest["chunk"][-1].as_py() == "0511"
    assert build_manifest(paths, 512, str).equals(build_manifest(list(paths), 512, str))  # deterministic


def _run_chunks(sample_mirror: Path, root: Path, order: list[int], crawl: str = CRAWL) -> Storage:
    store = Storage(str(root))
    source = SourceSettings(base=str(sample_mirror))
    paths = read_listing(CRAWL, source)
    for chunk in order:
        extract_chunk(store, crawl, buckets.chunk_key(chunk, 2), [paths[chunk]], 3, source=source)
    return store


def _dedup_all(store: Storage, crawl: str = CRAWL, earlier: list[str] | None = None) -> list[buckets.DedupReport]:
    chunks = [buckets.chunk_key(i, 2) for i in range(2)]
    return [buckets.dedup_bucket(store, crawl, buckets.bucket_key(b, 3), chunks, 3, earlier or []) for b in range(3)]


def test_dedup_is_deterministic_whatever_the_chunk_order(sample_mirror, tmp_path):
    a = _run_chunks(sample_mirror, tmp_path / "a", [0, 1])
    b = _run_chunks(sample_mirror, tmp_path / "b", [1, 0])
    ra, rb = _dedup_all(a), _dedup_all(b)
    assert [r.rows_out for r in ra] == [r.rows_out for r in rb]
    for bucket in range(3):
        key = buckets.unique_pairs_key(CRAWL, buckets.bucket_key(bucket, 3), 3)
        fa, fb = pl.read_parquet(a.uri(key)), pl.read_parquet(b.uri(key))
        assert fa.equals(fb)
        assert fa["url"].is_unique().all() and fa["url"].is_sorted()
    total_in = sum(r.rows_in for r in ra)
    total_out = sum(r.rows_out for r in ra)
    assert total_out < total_in  # the sample crawl repeats URLs across pages and files
    everything = pl.concat([pl.read_parquet(a.uri(buckets.unique_pairs_key(CRAWL, buckets.bucket_key(i, 3), 3)))
                            for i in range(3)])
    assert everything["occurrences"].sum() == total_in  # every input row is accounted for


def test_dedup_keeps_the_first_occurrence_in_crawl_order(tmp_path):
    store = Storage(str(tmp_path))
    rows = {
        "url": ["http://a/x.jpg", "http://a/x.jpg", "http://a/y.jpg"],
        "text": ["second", "first", "only"],
        "language": ["en"] * 3, "language_score": [0.9] * 3, "page_url": ["p"] * 3, "robots": [""] * 3,
        "crawl": ["c"] * 3, "wat_file": ["w2", "w1", "w1"], "record_offset": [5, 9, 1], "link_index": [0, 0, 0],
        "record_id": ["r"] * 3,
    }
    prefix = buckets.candidates_chunk_prefix("c", "0000", 1)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(rows).select(SCHEMA.names).cast(SCHEMA), buf)
    store.write_bytes(f"{prefix}/bucket=0000.parquet", buf.getvalue().to_pybytes())
    buckets.write_chunk_marker(store, prefix, {})
    report = buckets.dedup_bucket(store, "c", "0000", ["0000"], 1, [])
    out = pl.read_parquet(store.uri(buckets.unique_pairs_key("c", "0000", 1)))
    assert report.rows_in == 3 and report.rows_out == 2
    assert out.filter(pl.col("url") == "http://a/x.jpg")["text"].to_list() == ["first"]
    assert out["occurrences"].to_list() == [2, 1]


def test_cross_crawl_dedup_against_earlier_crawls(sample_mirror, tmp_path):
    store = _run_chunks(sample_mirror, tmp_path, [0, 1])
    _dedup_all(store)
    # A later crawl that saw the same pages: every URL was already released by the earlier crawl.
    _run_chunks(sample_mirror, tmp_path, [0, 1], crawl="CC-MAIN-2099-02")
    later = _dedup_all(store, "CC-MAIN-2099-02", earlier=[CRAWL])
    assert sum(r.rows_in for r in later) > 0
    assert sum(r.rows_out for r in later) == 0
    assert all(r.earlier_crawls == [CRAWL] for r in later)
    assert sum(r.seen_in_earlier_crawls for r in later) == sum(r.unique_in_crawl for r in later)


def test_dedup_refuses_incomplete_chunks(sample_mirror, tmp_path):
    store = _run_chunks(sample_mirror, tmp_path, [0])
    with pytest.raises(buckets.IncompleteChunksError, match="0001"):
        _dedup_all(store)


def test_killed_chunk_leaves_no_marker_and_rerun_is_identical(sample_mirror, tmp_path, monkeypatch):
    store = Storage(str(tmp_path))
    source = SourceSettings(base=str(sample_mirror))
    paths = read_listing(CRAWL, source)

    def boom(self, local_path, key):
        raise KeyboardInterrupt  # the process dies while committing bucket files

    monkeypatch.setattr(Storage, "put_file", boom)
    with pytest.raises(KeyboardInterrupt):
        extract_chunk(store, CRAWL, "0000", [paths[0]], 3, source=source)
    monkeypatch.undo()
    assert buckets.complete_chunks(store, CRAWL, 3) == set()
    assert not [k for k in store.list("") if ".tmp" in k]
    extract_chunk(store, CRAWL, "0000", [paths[0]], 3, source=source)
    extract_chunk(store, CRAWL, "0001", [paths[1]], 3, source=source)
    first = [pl.read_parquet(store.uri(k)) for k in store.list("crawls") if k.endswith(".parquet")]
    extract_chunk(store, CRAWL, "0000", [paths[0]], 3, source=source)  # a rerun of a finished chunk
    again = [pl.read_parquet(store.uri(k)) for k in store.list("crawls") if k.endswith(".parquet")]
    assert all(x.equals(y) for x, y in zip(first, again, strict=True))
