"""filtered_metadata, image_dedup and release as Dagster assets on synthetic upstream outputs: LAION's columns,
crawl-wide and cross-crawl dedup, parts and the manifest written last, missing partitions refused."""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.release.columns import FILTERED_SCHEMA, LAION_COLUMNS, url_text_hash
from laion_assets_tests.graph import LAYOUT, output
from laion_assets_tests.release.upstream import local_graph, write_bucket, write_crawl

CRAWL = "CC-MAIN-2099-01"
LATER = "CC-MAIN-2099-05"


def _filtered(store, crawl: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(store.uri(paths.filtered_metadata(crawl, b, LAYOUT)))
                      for b in LAYOUT.bucket_keys()])


def test_release_of_a_crawl_in_laion_columns_with_crawl_wide_dedup(tmp_path):
    graph, store = local_graph(tmp_path)
    made = write_crawl(store, CRAWL, n=400, shared_images=5)
    graph.release(CRAWL, {"rows_per_part": 100})
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks if not c.passed]
    assert not failed, failed
    rows = _filtered(store, CRAWL)
    assert rows.columns[: len(LAION_COLUMNS)] == LAION_COLUMNS and rows.columns == FILTERED_SCHEMA.names
    kept = sum(m.scores["keep"].to_pylist().count(True) for m in made.values())
    assert rows.height == kept and rows["key"].n_unique() <= rows.height
    # WIDTH/HEIGHT are the original image's size; hash is the documented one; subsets follow LANGUAGE.
    source = pl.concat([pl.from_arrow(m.rows) for m in made.values()]).unique("url")
    joined = rows.join(source, left_on="URL", right_on="url")
    assert (joined["WIDTH"] == joined["original_width"]).all() and (joined["HEIGHT"] == joined["original_height"]).all()
    assert rows["hash"].to_list() == url_text_hash(rows["URL"].to_list(), rows["TEXT"].to_list()).tolist()
    assert set(rows.filter(pl.col("LANGUAGE") == "en")["subset"]) == {"en"}
    assert set(rows.filter(pl.col("LANGUAGE") == "")["subset"]) == {"nolang"}
    assert rows["punsafe"].null_count() == 0 and rows["similarity"].null_count() == 0
    # The same bytes in two buckets: the later bucket's sample points at bucket 0000's, crawl-wide.
    shared = rows.filter(pl.col("sha256").str.starts_with("0" * 60)).filter(pl.len().over("sha256") > 1)
    assert shared["sha256"].n_unique() >= 2
    for _, group in shared.group_by("sha256"):
        winners = group.filter(pl.col("duplicate_of").is_null())
        assert winners.height == 1
        w = winners.row(0, named=True)
        assert set(group["duplicate_of"].drop_nulls()) == {f"{CRAWL}/{w['shard'].split('bucket=')[1][:4]}/{w['key']}"}
        assert w["shard"].split("bucket=")[1][:4] == min(g.split("bucket=")[1][:4] for g in group["shard"])
    assert rows["duplicate_of"].drop_nulls().len() > 0 and rows["near_duplicate_of"].drop_nulls().len() > 0
    # The release: exact duplicates dropped, near ones kept (marked); parts of at most 100 rows; manifest last.
    manifest = json.loads(store.read_bytes(paths.release_manifest(CRAWL)))
    released = rows.filter(pl.col("duplicate_of").is_null())
    assert sum(manifest["counts"].values()) == released.height
    assert manifest["dropped"]["exact_duplicates"] == rows.height - released.height
    for subset in ("en", "multi", "nolang"):
        assert manifest["counts"][subset] == released.filter(pl.col("subset") == subset).height
    for part in manifest["parts"]:
        key = paths.join(paths.release(CRAWL), part["file"])
        data = store.read_bytes(key)
        assert hashlib.sha256(data).hexdigest() == part["sha256"] and len(data) == part["bytes"]
        meta = pq.ParquetFile(store.uri(key))
        assert meta.metadata.num_rows == part["rows"] <= 100 and meta.metadata.row_group(0).column(0).compression \
            == "ZSTD"
        assert part["file"].startswith(part["subset"] + "/part-")
    assert store.size(paths.release_manifest(CRAWL)) and manifest["code_version"] and manifest["created"]
    assert any(k.startswith("clip:") for k in manifest["models"]) and "safety" in manifest["models"]
    part_files = [store.uri(paths.join(paths.release(CRAWL), p["file"])) for p in manifest["parts"]]
    release = pl.read_parquet(part_files)
    assert release["duplicate_of"].null_count() == release.height
    assert graph.meta["release"][-1]["dagster/row_count"] == released.height
    # A rebuild with bigger parts leaves no stale part behind.
    graph.run("release", CRAWL, {"rows_per_part": 1_000_000})
    listed = [k for k in store.list(paths.release(CRAWL)) if k.endswith(".parquet")]
    assert len(listed) == 3 and all(k.endswith("part-00000.parquet") for k in listed)


def test_images_of_an_earlier_crawl_win_over_a_later_crawl(tmp_path):
    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=200, seed=1, shared_images=5)
    graph.release(CRAWL)
    write_crawl(store, LATER, n=200, seed=2, shared_images=5)  # the same five images again
    graph.release(LATER)
    earlier = _filtered(store, CRAWL)
    later = _filtered(store, LATER)
    shared_later = later.filter(pl.col("sha256").is_in(earlier.filter(pl.col("duplicate_of").is_null())["sha256"]
                                                       .implode()))
    assert shared_later.height > 0
    assert all(d.startswith(CRAWL + "/") for d in shared_later["duplicate_of"].to_list())
    assert graph.meta["image_dedup"][-1]["earlier_crawls"] == [CRAWL]


def test_missing_upstream_partitions_fail_naming_them_and_write_nothing(tmp_path):
    graph, store = local_graph(tmp_path)
    made = write_crawl(store, CRAWL, n=50)
    graph.instance.add_dynamic_partitions("crawls", [CRAWL])
    graph.run("image_dedup", CRAWL)
    graph.run("semantic_dedup", CRAWL)
    graph.run("filtered_metadata", dg.MultiPartitionKey({"crawl": CRAWL, "bucket": "0000"}))
    result = graph.run("release", CRAWL, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "filtered_metadata" in str(failure.event_specific_data.error) and "0001" in str(
        failure.event_specific_data.error)
    assert not store.list(paths.release(CRAWL))
    # A crawl-level input with a bucket missing is refused the same way.
    other = "CC-MAIN-2099-09"
    write_bucket(store, other, "0000", made["0000"])
    graph.instance.add_dynamic_partitions("crawls", [other])
    result = graph.run("image_dedup", other, raise_on_error=False)
    assert not result.success and not store.exists(output("image_dedup", other))
