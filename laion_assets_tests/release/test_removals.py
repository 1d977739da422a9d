"""Removal lists: append-only versions, the CLI, malformed entries refused with nothing written, the matching API,
and removals applied by the release (never brought back by a rebuild); a new version re-runs the release through
the REPROCESS automation."""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core import paths
from laion_assets.core.release import removals as rl
from laion_assets.core.storage import Storage
from laion_assets_tests.graph import LAYOUT
from laion_assets_tests.release.upstream import local_graph, report_made, write_crawl

CRAWL = "CC-MAIN-2099-01"


def test_matching_api_names_the_reason_and_rule_of_each_row():
    removal_list = rl.RemovalList("v000001", (
        rl.make_entry("url", "https://a.example/x.jpg", "partner"),
        rl.make_entry("domain", "bad.example", "domain request"),
        rl.make_entry("domain", "https://ok.example/users/7/", "user request"),
        rl.make_entry("sha256", "AB" * 32, "hash list"),
        rl.make_entry("md5", hashlib.md5(b"https://m.example/1.jpg").hexdigest(), "md5 list"),
        rl.make_entry("phash", "00000000000000ff", "near picture", radius=4)))
    table = pa.table({
        "URL": ["https://a.example/x.jpg", "http://img.bad.example/y", "https://ok.example/users/7/z.png",
                "https://c.example/1", "https://m.example/1.jpg", "https://d.example/1", "https://notbad.example/",
                "https://ok.example/users/70/"],
        "sha256": [None, None, None, "ab" * 32, None, None, None, None],
        "phash": [None, None, None, None, None, "000000000000000f", "ffff000000000000", None]})
    got = removal_list.match(table).to_pylist()
    assert [r["reason"] for r in got] == ["partner", "domain request", "user request", "hash list", "md5 list",
                                          "near picture", None, None]
    assert [r["removed"] for r in got] == [True] * 6 + [False] * 2
    assert got[5]["rule"] == "phash:00000000000000ff~4"


def test_versions_are_append_only_and_a_malformed_entry_changes_nothing(tmp_path):
    runner = CliRunner()
    storage = str(tmp_path / "data")
    result = runner.invoke(main, ["removals", "add", "--storage", storage, "--url", "https://a.example/1.jpg",
                                  "--domain", "bad.example", "--reason", "partner request"])
    assert result.exit_code == 0, result.output
    listing = tmp_path / "bad.txt"
    listing.write_text("# from the partner\nurl https://b.example/2.jpg\n\nsha256 1234\nphash 00ff00ff00ff00ff 3\n")
    result = runner.invoke(main, ["removals", "add", "--storage", storage, "--file", str(listing), "--reason", "x"])
    assert result.exit_code != 0 and "line 4" in result.output and "sha256" in result.output
    assert "unchanged" in result.output
    store = Storage(storage)
    assert rl.versions(store) == [1]
    result = runner.invoke(main, ["removals", "add", "--storage", storage, "--phash", "00ff00ff00ff00ff",
                                  "--reason", "no radius"])
    assert result.exit_code != 0 and rl.versions(store) == [1]
    listing.write_text("url https://b.example/2.jpg\nphash 00ff00ff00ff00ff 3\nmd5 " + "0" * 32 + "\n")
    result = runner.invoke(main, ["removals", "add", "--storage", storage, "--file", str(listing), "--reason", "y"])
    assert result.exit_code == 0, result.output
    first = store.read_bytes(paths.removal_version(1))
    assert rl.versions(store) == [1, 2] and store.read_bytes(paths.removal_version(1)) == first
    assert len(rl.load(store)) == 5 and len(rl.load(store, 1)) == 2 and rl.load(store).version == "v000002"
    result = runner.invoke(main, ["removals", "list", "--storage", storage])
    assert result.exit_code == 0 and "v000001" in result.output and "v000002" in result.output
    with pytest.raises(KeyError):
        rl.load(store, 7)


def _release_rows(store, crawl: str) -> pl.DataFrame:
    manifest = json.loads(store.read_bytes(paths.release_manifest(crawl)))
    return pl.read_parquet([store.uri(paths.join(paths.release(crawl), p["file"])) for p in manifest["parts"]])


def test_removed_samples_leave_the_release_and_never_come_back(tmp_path):
    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=300)
    graph.release(CRAWL)
    before = _release_rows(store, CRAWL)
    stats_before = json.loads(store.read_bytes(paths.statistics_json(CRAWL)))
    url, sha, near = before.row(0, named=True), before.row(1, named=True), before.row(2, named=True)
    host_rows = before.filter(pl.col("URL").str.contains("host1.example"))
    flipped = f"{int(near['phash'], 16) ^ 0b1011:016x}"  # three bits from a released image
    rl.add(store, [rl.make_entry("url", url["URL"], "url request"),
                   rl.make_entry("domain", "host1.example", "domain request"),
                   rl.make_entry("sha256", sha["sha256"], "hash list"),
                   rl.make_entry("phash", flipped, "near picture", radius=4)])
    graph.release(CRAWL)
    after = _release_rows(store, CRAWL)
    assert url["URL"] not in after["URL"].to_list() and sha["sha256"] not in after["sha256"].to_list()
    assert not after.filter(pl.col("URL").str.contains("host1.example")).height and host_rows.height
    assert near["phash"] not in after["phash"].to_list()
    manifest = json.loads(store.read_bytes(paths.release_manifest(CRAWL)))
    assert manifest["removal_version"] == "v000001"
    assert set(manifest["removed"]) == {"url request", "domain request", "hash list", "near picture"}
    assert manifest["removed"]["domain request"] >= host_rows.height
    stats = json.loads(store.read_bytes(paths.statistics_json(CRAWL)))
    assert stats["subsets"]["all"]["total"] == after.height < stats_before["subsets"]["all"]["total"]
    meta = graph.meta["filtered_metadata"][-1]
    assert meta["removal_version"] == "v000001" and "removed/domain request" in meta or any(
        "removed/domain request" in m for m in graph.meta["filtered_metadata"][-LAYOUT.buckets:])
    # Rebuilding only the filtered metadata and release from an image dedup made before a newer version still
    # leaves the newly removed sample out.
    keep = after.row(0, named=True)
    rl.add(store, [rl.make_entry("url", keep["URL"], "late request")])
    for bucket in LAYOUT.bucket_keys():
        graph.run("filtered_metadata", dg.MultiPartitionKey({"crawl": CRAWL, "bucket": bucket}))
    graph.run("release", CRAWL)
    assert keep["URL"] not in _release_rows(store, CRAWL)["URL"].to_list()


def test_a_new_removal_version_requests_the_release_again_through_reprocess(tmp_path):
    from laion_assets.definitions import build_definitions
    from laion_assets_tests.graph import OPS

    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=100)
    defs = build_definitions(LAYOUT, graph.resources, OPS)
    sensor = defs.get_sensor_def("observe_removals")

    def tick(cursor: str | None = None):
        with dg.build_sensor_context(instance=graph.instance, cursor=cursor, definitions=defs,
                                     resources=defs.resources) as context:
            result = sensor(context)
        for event in result.asset_events:
            graph.instance.report_runless_asset_event(event)
        return result

    graph.instance.add_dynamic_partitions("crawls", [CRAWL])
    report_made(graph, CRAWL, ("unique_pairs", "image_shards", "clip_scores", "safety_scores", "watermark_scores",
                           "aesthetic_scores"))
    first = tick()
    assert first.asset_events[0].tags["dagster/data_version"] == "none"
    graph.release(CRAWL)
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance)
    assert tick(first.cursor).skip_reason  # nothing new: no observation
    calm = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance, cursor=quiet.cursor)
    assert not calm.get_requested_partitions(dg.AssetKey("image_dedup"))
    rl.add(store, [rl.make_entry("url", "https://host0.example/img/000000001.jpg", "url request")])
    changed = tick(first.cursor)
    assert changed.asset_events[0].tags["dagster/data_version"] == "v000001"
    after = dg.evaluate_automation_conditions(defs=defs, instance=graph.instance, cursor=calm.cursor)
    assert after.get_requested_partitions(dg.AssetKey("image_dedup")) == {CRAWL}
