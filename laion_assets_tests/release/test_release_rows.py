"""The release's blocking row check: the parts' stored rows equal the filtered rows (removals already out) less the
duplicates the settings drop, and a part that lost rows fails it."""

from __future__ import annotations

import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.release import removals as rl
from laion_assets.core.release.filtered import FilteredBucket
from laion_assets.core.release.release import ReleaseManifest, account_rows
from laion_assets.core.settings import ReleaseSettings
from laion_assets_tests.graph import LAYOUT, output
from laion_assets_tests.release.upstream import local_graph, write_crawl

CRAWL = "CC-MAIN-2099-01"


def test_release_rows_are_the_filtered_rows_less_removals_and_dropped_duplicates(tmp_path):
    graph, store = local_graph(tmp_path)
    write_crawl(store, CRAWL, n=120)
    graph.release(CRAWL)
    manifest = ReleaseManifest.from_json(store.read_bytes(paths.release_manifest(CRAWL)))
    first = store.read_parquet(manifest.part_keys()[0])
    rl.add(store, [rl.make_entry("url", first["URL"][0].as_py(), "url request")])
    graph.release(CRAWL)
    check = [c for c in graph.checks if c.check_name == "rows_match_filtered"]
    assert len(check) == 2 and all(c.passed for c in check)
    buckets = {b: FilteredBucket.from_json(store.read_bytes(output("filtered_metadata", CRAWL, b, ".json")))
               for b in LAYOUT.bucket_keys()}
    manifest = ReleaseManifest.from_json(store.read_bytes(paths.release_manifest(CRAWL)))
    account = account_rows(store, manifest, buckets, ReleaseSettings())
    assert account.holds and account.removed >= 1 and account.dropped_duplicates > 0
    assert account.released == manifest.rows
    # A part that lost a row no longer adds up.
    part = store.uri(manifest.part_keys()[0])
    pq.write_table(pq.read_table(part).slice(1), part)
    broken = account_rows(store, manifest, buckets, ReleaseSettings())
    assert not broken.holds and broken.released == account.released - 1
    # Keeping the duplicates in the release expects them back.
    assert account_rows(store, manifest, buckets, ReleaseSettings(drop_exact_duplicates=False)).expected == \
        account.filtered
