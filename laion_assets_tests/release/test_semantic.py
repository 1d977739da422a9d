"""Semantic dedup: planted duplicates found, winners independent of the order sources come in, removed samples
never win, the spilled path the same as the in-memory one, embeddings of another model refused naming both, and
`semantic_duplicate_of` through filtered metadata, the release (marked, or dropped when asked) and statistics."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from laion_assets.core import paths
from laion_assets.core.clip.embeddings import EmbeddingModelMismatch, write_embeddings
from laion_assets.core.release import semantic
from laion_assets.core.release.semdedup import SemanticDeduper, cluster_pairs
from laion_assets.core.settings import ReleaseSettings
from laion_assets.core.storage import Storage
from laion_assets_tests.graph import LAYOUT
from laion_assets_tests.release.upstream import local_graph, write_crawl

CRAWL, LATER = "CC-MAIN-2099-01", "CC-MAIN-2099-05"
DIM = 32


def _crawl(seed: int = 0, buckets: int = 4, n: int = 300, copies: int = 40):
    """Clustered unit vectors per bucket; `copies` rows of later buckets copy a row of an earlier one (plus noise,
    cosine ~0.998). Returns {bucket: (keys, vectors)} and the planted pairs as (copy name, original name)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, DIM))
    data, planted = {}, []
    for b in range(buckets):
        x = centres[rng.integers(0, 8, n)] + rng.standard_normal((n, DIM))
        data[f"{b:04d}"] = [[f"{i:06d}" for i in range(n)], x]
    # Copies go to distinct rows of buckets 1.., their originals are rows of bucket 0 (never overwritten).
    targets = rng.choice((buckets - 1) * n, copies, replace=False)
    for t in targets.tolist():
        b, j, i = 1 + t // n, t % n, int(rng.integers(0, n))
        data[f"{b:04d}"][1][j] = data["0000"][1][i] + 0.02 * rng.standard_normal(DIM)
        planted.append((f"{CRAWL}/{b:04d}/{j:06d}", f"{CRAWL}/0000/{i:06d}"))
    for value in data.values():
        value[1] = (value[1] / np.linalg.norm(value[1], axis=1, keepdims=True)).astype(np.float16)
    return data, planted


def _dedup(tmp_path, data, order=None, partition_rows=10_000, cluster_rows=100, competes=None, shuffle=False,
           name="run") -> tuple[dict[str, tuple[str, float]], SemanticDeduper]:
    """sample name -> (winner name, similarity) of every marked sample."""
    sources = [(CRAWL, b) for b in data]
    deduper = SemanticDeduper(sources, 0.05, str(tmp_path / name), sum(len(k) for k, _ in data.values()),
                              partition_rows, cluster_rows)
    rng = np.random.default_rng(1)
    for b in order or list(data):
        keys, x = data[b]
        mask = np.ones(len(keys), bool) if competes is None else competes[b]
        rows = rng.permutation(len(keys)) if shuffle else np.arange(len(keys))
        deduper.add(CRAWL, b, pl.Series("key", [keys[i] for i in rows]), x[rows], mask[rows])
    marks = deduper.finish()
    names = deduper.names(pl.concat([marks["sid"], marks["semantic_duplicate_of"]]))
    named = (marks.join(names, on="sid").join(names.rename({"sid": "semantic_duplicate_of", "name": "winner"}),
                                              on="semantic_duplicate_of"))
    return {r["name"]: (r["winner"], r["semantic_similarity"]) for r in named.iter_rows(named=True)}, deduper


def test_cluster_pairs_name_the_first_earlier_partner_above_the_threshold():
    x = np.eye(4, dtype=np.float32)
    x[2] = x[0]
    x[3] = (x[0] + 0.01 * x[1]) / np.linalg.norm(x[0] + 0.01 * x[1])
    first, sims, pairs = cluster_pairs(x, 0.95)
    assert first.tolist() == [-1, -1, 0, 0] and sims[2] == pytest.approx(1.0)
    assert sorted(map(tuple, pairs.tolist())) == [(2, 0), (3, 0), (3, 2)]


def test_planted_duplicates_are_found_and_the_winner_is_the_first_by_name(tmp_path):
    data, planted = _crawl()
    marks, deduper = _dedup(tmp_path, data)
    for copy, original in planted:
        assert copy in marks, copy
        winner, sim = marks[copy]
        assert winner == original and sim >= 0.95
    assert all(winner < name for name, (winner, _) in marks.items())
    assert deduper.counts.clusters > 1 and not deduper.counts.spilled


def test_the_winner_does_not_depend_on_the_order_sources_and_rows_come_in(tmp_path):
    data, _ = _crawl(seed=3)
    first, _ = _dedup(tmp_path, data, name="a")
    again, _ = _dedup(tmp_path, data, order=list(reversed(data)), shuffle=True, name="b")
    assert {k: v[0] for k, v in first.items()} == {k: v[0] for k, v in again.items()}


def test_removed_samples_never_win_nor_are_marked(tmp_path):
    data, planted = _crawl(seed=4)
    removed = {b: np.ones(len(k), bool) for b, (k, _) in data.items()}
    originals = {o for _, o in planted}
    for o in originals:
        _, b, key = o.split("/")
        removed[b][int(key)] = False
    marks, _ = _dedup(tmp_path, data, competes=removed)
    assert not originals & set(marks) and not originals & {w for w, _ in marks.values()}


def test_the_spilled_path_finds_what_the_in_memory_one_does(tmp_path):
    data, planted = _crawl(seed=5)
    in_memory, small = _dedup(tmp_path, data, name="memory")
    spilled, big = _dedup(tmp_path, data, partition_rows=200, name="spill")
    assert big.counts.spilled and big.counts.partitions > 1 and not small.counts.spilled
    assert {c for c, _ in planted} <= set(spilled)
    assert {k: v[0] for k, v in spilled.items()} == {k: v[0] for k, v in in_memory.items()}
    assert not (tmp_path / "spill" / "parts").exists() and not (tmp_path / "spill" / "raw").exists()


def test_embeddings_of_another_dimension_or_model_are_refused_naming_both(tmp_path):
    deduper = SemanticDeduper([(CRAWL, "0000"), (CRAWL, "0001")], 0.05, str(tmp_path), 10, 10, 10)
    deduper.add(CRAWL, "0000", pl.Series(["a"]), np.ones((1, 768), np.float16), np.ones(1, bool))
    with pytest.raises(EmbeddingModelMismatch, match="512-d embeddings among 768-d"):
        deduper.add(CRAWL, "0001", pl.Series(["b"]), np.ones((1, 512), np.float16), np.ones(1, bool))
    store = Storage(str(tmp_path / "root"))
    keys = paths.bucket_embeddings(CRAWL, "0000", LAYOUT)
    meta = pa.table({"key": ["a"], "url": ["u"], "caption": ["c"], "language": ["en"], "model": ["ViT-B-32"]})
    write_embeddings(store, keys, np.ones((1, 512), np.float16), np.ones((1, 512), np.float16), meta)
    dedup = pl.LazyFrame({"crawl": [CRAWL], "bucket": ["0000"], "key": ["a"], "url": ["u"], "sha256": ["0"],
                          "phash": ["0"], "duplicate_of": [None], "removed": [None]},
                         schema_overrides={"duplicate_of": pl.String, "removed": pl.String})
    with pytest.raises(EmbeddingModelMismatch, match="ViT-B-32.*ViT-L-14"):
        semantic.run(store, CRAWL, {"0000": keys}, dedup, {}, ReleaseSettings(), "ViT-L-14")
    # An earlier crawl deduplicated with another model is refused the same way.
    earlier = semantic.EarlierCrawl(pl.LazyFrame({"bucket": ["0000"], "key": ["a"], "model": ["ViT-H-14"],
                                                  "semantic_duplicate_of": [None], "removed": [None]},
                                                 schema_overrides={"semantic_duplicate_of": pl.String,
                                                                   "removed": pl.String}), {"0000": keys})
    with pytest.raises(EmbeddingModelMismatch, match="ViT-H-14.*ViT-B-32"):
        semantic.run(store, LATER, {}, dedup.clear(), {CRAWL: earlier}, ReleaseSettings(), "ViT-B-32")


def _filtered(store, crawl: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(store.uri(paths.filtered_metadata(crawl, b, LAYOUT)))
                      for b in LAYOUT.bucket_keys()])


def _released(store, crawl: str) -> pl.DataFrame:
    manifest = json.loads(store.read_bytes(paths.release_manifest(crawl)))
    return pl.read_parquet([store.uri(paths.join(paths.release(crawl), p["file"])) for p in manifest["parts"]])


def test_the_column_goes_through_filtered_metadata_release_and_statistics_and_can_be_dropped(tmp_path):
    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=300, shared_images=5)
    graph.release(CRAWL)
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks if not c.passed]
    assert not failed, failed
    meta = graph.meta["semantic_dedup"][-1]
    rows = _filtered(store, CRAWL)
    marked = rows.filter(pl.col("semantic_duplicate_of").is_not_null())
    assert marked.height > 0 and meta["duplicates"] >= marked.height
    assert 0 < meta["semantic_duplicate_share"] < 1 and "model" in meta
    # The five shared images: exact duplicates, not compared again (their winner is the image dedup's).
    assert rows.filter(pl.col("duplicate_of").is_not_null())["semantic_duplicate_of"].null_count() == rows.filter(
        pl.col("duplicate_of").is_not_null()).height
    names = marked.select(pl.concat_str([pl.lit(CRAWL + "/"), pl.col("shard").str.extract(r"bucket=(\d+)"),
                                         pl.lit("/"), pl.col("key")]).alias("name"), "semantic_duplicate_of")
    assert (names["semantic_duplicate_of"] < names["name"]).all()
    # Marked only by default: the release keeps them, and the statistics count them.
    manifest = json.loads(store.read_bytes(paths.release_manifest(CRAWL)))
    released = _released(store, CRAWL)
    assert released["semantic_duplicate_of"].drop_nulls().len() == marked.filter(
        pl.col("duplicate_of").is_null()).height
    assert manifest["duplicates"]["semantic"] == marked.height and manifest["dropped"]["semantic_duplicates"] == 0
    stats = json.loads(store.read_bytes(paths.statistics_json(CRAWL)))
    assert stats["subsets"]["all"]["semantic_duplicates"] == released["semantic_duplicate_of"].drop_nulls().len()
    assert "all/semantic_duplicates" in graph.meta["dataset_statistics"][-1]
    # Dropped when the release is told to.
    graph.run("release", CRAWL, {"drop_semantic_duplicates": True})
    dropped = _released(store, CRAWL)
    assert dropped["semantic_duplicate_of"].null_count() == dropped.height
    assert dropped.height == released.height - released["semantic_duplicate_of"].drop_nulls().len()
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks if not c.passed]
    assert not failed, failed


def test_an_earlier_crawls_samples_win_over_a_later_crawls(tmp_path):
    from laion_assets.core.clip.embeddings import read_image_embeddings
    from laion_assets_tests.graph import output

    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=150, seed=1)
    graph.release(CRAWL)
    # The later crawl: other image bytes, but the earlier crawl's embedding for every key both have.
    write_crawl(store, LATER, n=150, seed=2)
    copied = []
    for bucket in LAYOUT.bucket_keys():
        theirs, their_meta = read_image_embeddings(store, paths.bucket_embeddings(CRAWL, bucket, LAYOUT))
        ours, meta = read_image_embeddings(store, paths.bucket_embeddings(LATER, bucket, LAYOUT))
        where = {k: i for i, k in enumerate(their_meta["key"].to_pylist())}
        for i, key in enumerate(meta["key"].to_pylist()):
            if key in where:
                ours[i] = theirs[where[key]]
                copied.append(f"{bucket}/{key}")
        made = write_embeddings(store, paths.bucket_embeddings(LATER, bucket, LAYOUT), ours, ours, meta)
        store.write_bytes(output("image_embeddings", LATER, bucket, ".json"), made.to_json())
    graph.release(LATER)
    later = _filtered(store, LATER)
    assert graph.meta["semantic_dedup"][-1]["earlier_crawls"] == [CRAWL]
    rows = later.with_columns(pl.concat_str([pl.col("shard").str.extract(r"bucket=(\d+)"), pl.lit("/"),
                                             pl.col("key")]).alias("at"))
    copies = rows.filter(pl.col("at").is_in(copied) & pl.col("duplicate_of").is_null())
    assert copies.height > 10 and copies["semantic_duplicate_of"].str.starts_with(CRAWL + "/").all()
