"""A URL list as a crawl of the graph: registered as list-NAME, materialized to a release and an index."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile

import dagster as dg
import pyarrow as pa
import pytest
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core import paths
from laion_assets.core.crawl import extract
from laion_assets.core.crawl.url_list import UrlList, compared_crawls
from laion_assets.core.release.release import ReleaseManifest
from laion_assets.core.settings import SAMPLE_CRAWL
from laion_assets.offline.demo import image_server
from laion_assets.operations import register_url_list
from laion_assets.partitions import crawl_partitions
from laion_assets_tests.graph import LAYOUT, Graph, graph_resources, output, release_crawl

LIST = "list-sample"


def sample_pairs(mirror) -> pa.Table:
    """The sample crawl's (url, text) pairs, as a published list would have them."""
    tables: list[pa.Table] = []
    wat = sorted((mirror / "crawl-data" / SAMPLE_CRAWL).rglob("*.warc.wat.gz"))
    extract.run([(str(p), p.name) for p in wat], SAMPLE_CRAWL, tables.append)
    return pa.concat_tables(tables)


def write_tsv_gz(path, pairs: pa.Table) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["url", "caption", "uid"])
    for i, (url, text) in enumerate(zip(pairs["url"].to_pylist(), pairs["text"].to_pylist(), strict=True)):
        writer.writerow([url, text.replace("\t", " ").replace("\n", " "), f"{i:032x}"])
    path.write_bytes(gzip.compress(buf.getvalue().encode()))


def test_a_list_registered_and_materialized_to_a_release_and_an_index(tmp_path):
    mirror = tmp_path / "mirror"
    graph = Graph(graph_resources(str(tmp_path / "data"), mirror))
    store = graph.resources["storage"].get()
    (mirror / "www").mkdir(parents=True)
    with image_server(str(mirror / "www"), port=0) as base:
        graph.run("sample_crawl", config={"image_base_url": base, "crawl": SAMPLE_CRAWL})
        pairs = sample_pairs(mirror)
        write_tsv_gz(tmp_path / "list.tsv.gz", pairs)  # no language column: CLD3 decides
        with pytest.raises(ValueError, match="no column 'key'"):
            register_url_list(graph.instance, store, UrlList("sample", str(tmp_path / "list.tsv.gz"), id_col="key"))
        crawl = register_url_list(graph.instance, store, UrlList("sample", str(tmp_path / "list.tsv.gz"),
                                                                 id_col="uid"))
        assert crawl == LIST and LIST in graph.instance.get_dynamic_partitions(crawl_partitions.name)
        assert store.exists(paths.url_list("sample"))
        graph.crawl(LIST, shard_config={"samples_per_shard": 64})
    meta = graph.meta
    assert sum(m["pairs"] for m in meta["candidate_pairs"]) == pairs.num_rows
    unique = pa.concat_tables([store.read_parquet(output("unique_pairs", LIST, b)) for b in LAYOUT.bucket_keys()])
    assert unique.num_rows == len(set(pairs["url"].to_pylist()))
    assert set(unique["language"].to_pylist()) - {""} and all(r for r in unique["record_id"].to_pylist())
    assert sum(m["success"] for m in meta["image_shards"]) > 0.5 * unique.num_rows
    # the list's uid in every row of the shards and each sample's .json
    uids: dict[str, set[str]] = {}  # a URL listed twice keeps one of its uids
    for i, url in enumerate(pairs["url"].to_pylist()):
        uids.setdefault(url, set()).add(f"{i:032x}")
    prefix = paths.image_shards(LIST, "0000", LAYOUT)
    rows = store.read_parquet(paths.shard(prefix, "00000").rows).to_pylist()
    assert rows and all(r["uid"] in uids[r["url"]] for r in rows)
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(paths.shard(prefix, "00000").tar))) as tar:
        first = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        sample = json.loads(tar.extractfile(first).read())
    assert sample["uid"] == next(r["uid"] for r in rows if r["key"] == sample["key"])
    release_crawl(graph, LIST)
    release = graph.meta["release"][-1]
    assert release["dagster/row_count"] > 0
    # ... and through the filtered metadata into every release part, so the release joins back to the list
    filtered = store.read_parquet(paths.filtered_metadata(LIST, "0000", LAYOUT))
    assert filtered.num_rows and all(u in uids[url] for u, url in zip(filtered["uid"].to_pylist(),
                                                                    filtered["URL"].to_pylist(), strict=True))
    manifest = ReleaseManifest.from_json(store.read_bytes(paths.release_manifest(LIST)))
    released = pa.concat_tables([store.read_parquet(k) for k in manifest.part_keys()])
    assert released.num_rows == release["dagster/row_count"]
    assert released.column_names[-1] == "uid" and released["uid"].null_count == 0
    assert all(u in uids[url] for u, url in zip(released["uid"].to_pylist(), released["URL"].to_pylist(), strict=True))
    graph.run("knn_index", LIST)
    assert graph.meta["knn_index"][-1]
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks if not c.passed]
    assert not failed, failed


def test_cross_crawl_dedup_leaves_lists_alone_unless_asked():
    registered = ["CC-MAIN-2023-01", "CC-MAIN-2024-01", "list-a", "list-b"]
    assert compared_crawls("list-b", registered, False) == []
    assert compared_crawls("list-b", registered, True) == ["CC-MAIN-2023-01", "CC-MAIN-2024-01", "list-a"]
    assert compared_crawls("CC-MAIN-2024-01", registered, True) == ["CC-MAIN-2023-01"]


def test_lists_add_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "l.jsonl").write_text('{"url": "http://example.com/a.jpg", "caption": "a"}\n')
    result = CliRunner().invoke(main, ["lists", "add", "mine", str(tmp_path / "l.jsonl"), "--storage",
                                       str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "list-mine" in result.output
    assert "list-mine" in dg.DagsterInstance.get().get_dynamic_partitions(crawl_partitions.name)
    bad = CliRunner().invoke(main, ["lists", "add", "Bad Name", str(tmp_path / "l.jsonl"), "--storage",
                                    str(tmp_path / "data")])
    assert bad.exit_code != 0 and "list name" in bad.output
