"""The release of the sample crawl through the whole graph (real downloads from a loopback server, the small CLIP
models): LAION's columns on real rows, removals of a URL, a domain, a sha256 and a pHash taking effect."""

from __future__ import annotations

import json

import dagster as dg
import polars as pl

from laion_assets.core import paths
from laion_assets.core.release import removals as rl
from laion_assets.core.settings import SAMPLE_CRAWL
from laion_assets_tests.graph import LAYOUT, Graph, graph_resources, output, release_crawl


def _released(store) -> pl.DataFrame:
    manifest = json.loads(store.read_bytes(paths.release_manifest(SAMPLE_CRAWL)))
    return pl.read_parquet([store.uri(paths.join(paths.release(SAMPLE_CRAWL), p["file"])) for p in manifest["parts"]])


def check_concept_filter(graph, store, models) -> set[str]:
    """The concept filter's rule on the sample crawl with the small preset's concept file: a sample above a `nsfw`
    threshold and above a `special` one is removed from the filtered metadata (reason concept-filter, counted);
    every other sample keeps its highest similarity per group in its safety scores. Returns the removed URLs."""
    from laion_assets.core.clip.concepts import load_concepts

    concepts = load_concepts(models.concepts)
    thresholds = {g: set(c.values()) for g, c in concepts.groups.items()}
    assert all(len(t) == 1 for t in thresholds.values())  # the small file: one threshold per group
    # (keys repeat across buckets: samples are named by URL)
    safety = pl.concat([pl.read_parquet(store.uri(output("safety_scores", SAMPLE_CRAWL, b))).join(
        pl.read_parquet(store.uri(output("clip_scores", SAMPLE_CRAWL, b)), columns=["key", "url"]), on="key")
        for b in LAYOUT.bucket_keys()])
    rule = ((pl.col("nsfw_similarity") > thresholds["nsfw"].pop())
            & (pl.col("special_similarity") > thresholds["special"].pop()))
    assert safety.select((rule == pl.col("concept_filtered")).all()).item()
    assert safety["nsfw_similarity"].null_count() == safety["special_similarity"].null_count() == 0
    flagged = set(safety.filter(pl.col("concept_filtered"))["url"])
    filtered = pl.concat([pl.read_parquet(store.uri(paths.filtered_metadata(SAMPLE_CRAWL, b, LAYOUT)))
                          for b in LAYOUT.bucket_keys()])
    assert flagged and not flagged & set(filtered["URL"])  # the calibrated file does filter some of the sample
    assert sum(m.get("removed/concept-filter", 0) for m in graph.meta["filtered_metadata"]) == len(flagged)
    return flagged


def test_sample_crawl_release_and_removals(tmp_path, models):
    graph = Graph(graph_resources(str(tmp_path / "data"), tmp_path / "mirror"))
    graph.whole_crawl(tmp_path / "mirror", sample={"wat_files": 2, "pages_per_file": 10})
    release_crawl(graph)
    # (A sample this small may fall outside the warning bands: only blocking checks must pass.)
    failed = [(c.asset_key.to_user_string(), c.check_name) for c in graph.checks
              if not c.passed and c.severity != dg.AssetCheckSeverity.WARN]
    assert not failed, failed
    store = graph.resources["storage"].get()
    kept = sum(m["kept"] for m in graph.meta["clip_scores"])
    flagged = check_concept_filter(graph, store, models)
    assert sum(m["rows"] for m in graph.meta["filtered_metadata"]) + len(flagged) == kept
    before = _released(store)
    assert not set(before["URL"]) & flagged and before["aesthetic"].null_count() == 0
    assert before.height == graph.meta["release"][-1]["rows"] > 0
    assert before["URL"].is_unique().all() and before["punsafe"].null_count() == 0
    assert (before["WIDTH"] > 0).all() and set(before["subset"]) <= {"en", "multi", "nolang"}
    # The shard column points at the tar the image is in.
    assert all(store.exists(s) for s in before["shard"].unique().to_list())
    stats_before = store.read_json(paths.statistics_json(SAMPLE_CRAWL))

    url, sha, near = before.row(0, named=True), before.row(1, named=True), before.row(2, named=True)
    # Every sample image is on 127.0.0.1: the domain entry is a URL prefix (ten of the sample's hundred images).
    folder, name = before.row(3, named=True)["URL"].rsplit("/", 1)
    prefix = f"{folder}/{name[:4]}"
    rl.add(store, [rl.make_entry("url", url["URL"], "url"), rl.make_entry("sha256", sha["sha256"], "sha256"),
                   rl.make_entry("phash", near["phash"], "phash", radius=2),
                   rl.make_entry("domain", prefix, "domain")])
    release_crawl(graph)
    after = _released(store)
    assert url["URL"] not in after["URL"].to_list() and sha["sha256"] not in after["sha256"].to_list()
    assert near["phash"] not in after["phash"].to_list()
    assert not after.filter(pl.col("URL").str.starts_with(prefix)).height
    assert after.height and before.filter(pl.col("URL").str.starts_with(prefix)).height < before.height
    manifest = json.loads(store.read_bytes(paths.release_manifest(SAMPLE_CRAWL)))
    assert manifest["removal_version"] == "v000001" and set(manifest["removed"]) <= {"url", "sha256", "phash",
                                                                                     "domain", "concept-filter"}
    assert manifest["removed"]["concept-filter"] == len(flagged)  # counted in the release too
    stats = store.read_json(paths.statistics_json(SAMPLE_CRAWL))
    assert stats["subsets"]["all"]["total"] == after.height < stats_before["subsets"]["all"]["total"]

    # Purge: the images leave the shards; webdataset still reads them; the other samples' bytes are unchanged.
    import tarfile

    import webdataset as wds
    from click.testing import CliRunner

    from laion_assets.cli import main

    removal_list = rl.load(store)
    tars = sorted(k for k in store.list(paths.crawl_root(SAMPLE_CRAWL)) if k.endswith(".tar"))
    removed: dict[str, set[str]] = {}
    for t in tars:
        rows = pl.read_parquet(store.uri(t.removesuffix(".tar") + ".parquet"))
        hit = rows.filter((pl.col("status") == "success") & removal_list.reasons(rows).is_not_null())
        removed[t] = set(hit["key"].to_list())
    assert sum(map(len, removed.values())) >= before.height - after.height > 0

    def members(shard: str) -> dict[str, bytes]:
        with tarfile.open(store.uri(shard)) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}

    old = {t: members(t) for t in tars}
    result = CliRunner().invoke(main, ["purge", "--storage", store.root, "--crawl", SAMPLE_CRAWL])
    assert result.exit_code == 0, result.output
    assert f"{sum(map(len, removed.values()))} samples purged" in result.output
    for t in tars:
        new = members(t)
        assert {n.split(".")[0] for n in new} == {n.split(".")[0] for n in old[t]} - removed[t]
        assert all(old[t][n] == data for n, data in new.items())
        samples = list(wds.WebDataset(store.uri(t), shardshuffle=False))
        assert samples and not {s["__key__"] for s in samples} & removed[t]
        rows = pl.read_parquet(store.uri(t.removesuffix(".tar") + ".parquet"))
        assert set(rows.filter(pl.col("status") == "removed")["key"]) == removed[t]
    again = CliRunner().invoke(main, ["purge", "--storage", store.root, "--crawl", SAMPLE_CRAWL])
    assert "0 samples purged" in again.output
