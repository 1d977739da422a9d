"""The bucket shuffle and the dedup: every pair in exactly one bucket, output independent of run order."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from laion_assets.core import paths
from laion_assets.core.crawl import buckets, dedup, extract
from laion_assets.core.crawl.candidates import SCHEMA
from laion_assets.core.crawl.extract import ExtractCounts, PairExtractor
from laion_assets.core.crawl.manifest import build_manifest, chunk_slices
from laion_assets.core.crawl.source import read_listing
from laion_assets.core.paths import Layout
from laion_assets.core.settings import SourceSettings
from laion_assets.core.storage import Storage

CRAWL = "CC-MAIN-2099-01"


def extract_chunk(store: Storage, crawl: str, chunk: str, wat_paths: list[str], layout: Layout,
                  source: SourceSettings) -> extract.ExtractReport:
    """One chunk of the parse stage, as the candidate_pairs asset runs it."""
    target = extract.ChunkTarget(store, crawl, chunk, layout)
    return extract.run(extract.chunk_locations(wat_paths, source), crawl, target, source=source)


def unique_key(crawl: str, bucket: str, layout: Layout) -> str:
    """Where the IO manager keeps unique_pairs of a bucket."""
    return paths.output_key(["unique_pairs"], {"crawl": crawl, "bucket": bucket}, layout, ".parquet")


def dedup_bucket(store: Storage, crawl: str, bucket: str, layout: Layout, earlier: list[str]) -> dedup.DedupReport:
    """One bucket's URL dedup, stored as the unique_pairs asset's output is."""
    unique, report = dedup.run(store, dedup.chunk_files(crawl, bucket, layout),
                               [(c, unique_key(c, bucket, layout)) for c in earlier])
    with store.staging_dir() as stage:
        unique.sink_parquet(os.path.join(stage, "u.parquet"))
        store.put_file(os.path.join(stage, "u.parquet"), unique_key(crawl, bucket, layout))
    return report


def complete_chunks(storage: Storage, crawl: str, layout: Layout) -> set[str]:
    """Chunk keys whose marker exists: their bucket files are all there."""
    return {key.rsplit("/", 2)[-2].partition("=")[2] for key in storage.list(paths.candidates(crawl, layout))
            if key.endswith("/" + paths.CHUNK_MARKER)}


def tmp_mirror_of(realdata: Path) -> Path:
    """A read-only view of the real listing laid out as a mirror (symlink; nothing is copied)."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    (root / "crawl-data/CC-MAIN-2023-50").mkdir(parents=True)
    (root / "crawl-data/CC-MAIN-2023-50/wat.paths.gz").symlink_to(realdata / "CC-MAIN-2023-50.wat.paths.gz")
    return root


def test_bucket_writer_puts_each_row_in_its_hash_bucket(tmp_path, sample_mirror):
    wat = sorted(sample_mirror.rglob("*.warc.wat.gz"))[0]
    table = PairExtractor().extract_file(str(wat), "w", "c", ExtractCounts())
    assert table.num_rows > 50
    writer = buckets.BucketWriter(str(tmp_path), Layout(chunks=1, buckets=7), SCHEMA)
    writer.write(table.slice(0, 30))
    writer.write(table.slice(30))
    files = list(writer.close().values())
    assert len(files) == 7 and all(os.path.exists(f) for f in files)
    seen = []
    for b, f in enumerate(files):
        urls = pq.read_table(f)["url"].to_pylist()
        assert all(xxhash.xxh3_64_intdigest(u.encode()) % 7 == b for u in urls)
        seen += urls
    assert sorted(seen) == sorted(table["url"].to_pylist())  # nothing lost, nothing duplicated


def test_manifest_chunks_a_real_listing(realdata):
    wat_paths = read_listing("CC-MAIN-2023-50", SourceSettings(base=str(tmp_mirror_of(realdata))))
    assert len(wat_paths) == 90_000
    slices = chunk_slices(len(wat_paths), 512)
    assert slices[0][0] == 0 and slices[-1][1] == 90_000
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
    assert {hi - lo for lo, hi in slices} <= {175, 176}
    layout = Layout(chunks=512, buckets=256)
    manifest = build_manifest(wat_paths, layout)
    assert manifest.num_rows == 90_000 and manifest["path"].to_pylist() == wat_paths
    assert manifest["chunk"][0].as_py() == "0000" and manifest["chunk"][-1].as_py() == "0511"
    assert build_manifest(wat_paths, layout).equals(build_manifest(list(wat_paths), layout))  # deterministic


LAYOUT = Layout(chunks=2, buckets=3)


def _run_chunks(sample_mirror: Path, root: Path, order: list[int], crawl: str = CRAWL) -> Storage:
    store = Storage(str(root))
    source = SourceSettings(base=str(sample_mirror))
    wat_paths = read_listing(CRAWL, source)
    for chunk in order:
        extract_chunk(store, crawl, LAYOUT.chunk_key(chunk), [wat_paths[chunk]], LAYOUT, source=source)
    return store


def _dedup_all(store: Storage, crawl: str = CRAWL, earlier: list[str] | None = None) -> list[dedup.DedupReport]:
    return [dedup_bucket(store, crawl, b, LAYOUT, earlier or []) for b in LAYOUT.bucket_keys()]


def test_dedup_is_deterministic_whatever_the_chunk_order(sample_mirror, tmp_path):
    a = _run_chunks(sample_mirror, tmp_path / "a", [0, 1])
    b = _run_chunks(sample_mirror, tmp_path / "b", [1, 0])
    ra, rb = _dedup_all(a), _dedup_all(b)
    assert [r.rows_out for r in ra] == [r.rows_out for r in rb]
    for bucket in LAYOUT.bucket_keys():
        key = unique_key(CRAWL, bucket, LAYOUT)
        fa, fb = pl.read_parquet(a.uri(key)), pl.read_parquet(b.uri(key))
        assert fa.equals(fb)
        assert fa["url"].is_unique().all() and fa["url"].is_sorted()
    total_in = sum(r.rows_in for r in ra)
    total_out = sum(r.rows_out for r in ra)
    assert total_out < total_in  # the sample crawl repeats URLs across pages and files
    everything = pl.concat([pl.read_parquet(a.uri(unique_key(CRAWL, b, LAYOUT))) for b in LAYOUT.bucket_keys()])
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
    layout = Layout(chunks=1, buckets=1)
    table = pa.table(rows).select(SCHEMA.names).cast(SCHEMA)
    store.write_parquet(paths.candidates_file("c", "0000", "0000", layout), table)
    store.write_bytes(paths.candidates_marker("c", "0000", layout), b"{}")  # the chunk is complete
    report = dedup_bucket(store, "c", "0000", layout, [])
    out = pl.read_parquet(store.uri(unique_key("c", "0000", layout)))
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
    with pytest.raises(dedup.IncompleteChunksError, match="0001"):
        _dedup_all(store)


def test_killed_chunk_leaves_no_marker_and_rerun_is_identical(sample_mirror, tmp_path, monkeypatch):
    store = Storage(str(tmp_path))
    source = SourceSettings(base=str(sample_mirror))
    wat_paths = read_listing(CRAWL, source)

    def boom(self, local_path, key):
        raise KeyboardInterrupt  # the process dies while committing bucket files

    monkeypatch.setattr(Storage, "put_file", boom)
    with pytest.raises(KeyboardInterrupt):
        extract_chunk(store, CRAWL, "0000", [wat_paths[0]], LAYOUT, source=source)
    monkeypatch.undo()
    assert complete_chunks(store, CRAWL, LAYOUT) == set()
    assert not [k for k in store.list("") if ".tmp" in k]
    extract_chunk(store, CRAWL, "0000", [wat_paths[0]], LAYOUT, source=source)
    extract_chunk(store, CRAWL, "0001", [wat_paths[1]], LAYOUT, source=source)
    first = [pl.read_parquet(store.uri(k)) for k in store.list("crawls") if k.endswith(".parquet")]
    extract_chunk(store, CRAWL, "0000", [wat_paths[0]], LAYOUT, source=source)  # a rerun of a finished chunk
    again = [pl.read_parquet(store.uri(k)) for k in store.list("crawls") if k.endswith(".parquet")]
    assert all(x.equals(y) for x, y in zip(first, again, strict=True))
