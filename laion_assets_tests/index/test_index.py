"""The kNN index core: autofaiss builds from clip-retrieval folders, metadata alignment, exclusions at build and
query time, merging on disk, and the measured figures."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from laion_assets.core import paths
from laion_assets.core.index.build import build_index, read_report
from laion_assets.core.index.merge import merge_indices
from laion_assets.core.index.metadata import MetadataError
from laion_assets.core.index.search import IndexUnavailable, RowFilter, open_index, search
from laion_assets.core.settings import IndexSettings
from laion_assets.core.storage import Storage
from laion_assets_tests.index.worlds import index_metadata, mixture_crawl

# IVF keeps the builds quick on 2 cores (autofaiss's own choice for a few thousand vectors, HNSW, spends most of
# its time tuning) and is what merging on disk is about.
SETTINGS = IndexSettings(index_key="IVF16,Flat", eval_queries=40, build_memory="1G", query_memory="256M")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    store = Storage(str(root / "data"))
    out = {}
    for crawl, seed in (("CC-MAIN-2099-01", 1), ("CC-MAIN-2099-02", 2)):
        buckets, table, vectors = mixture_crawl(store, crawl, seed=seed)
        removed = set(table["key"].to_pylist()[::97])
        folder = store.uri(paths.knn_index(crawl))
        report = build_index(store, buckets, table, folder, SETTINGS, exclude=removed)
        out[crawl] = {"folder": folder, "table": table, "vectors": vectors, "removed": removed, "report": report}
    return store, out


def test_build_writes_clip_retrieval_files_and_measures_them(built):
    _, crawls = built
    c = crawls["CC-MAIN-2099-01"]
    files = paths.index_files(c["folder"])
    for f in (files.image, files.text, files.image_infos, files.text_infos, files.metadata, files.report):
        assert os.path.getsize(f) > 0, f
    report = c["report"]
    assert report.rows_in == 1800 and report.excluded == len(c["removed"]) and report.rows == 1800 - report.excluded
    for m in ("image", "text"):
        r = report.modality(m)
        assert r.index_key == "IVF16,Flat" and r.vectors == report.rows and r.bytes == os.path.getsize(files.index(m))
        assert r.quality["eval_queries"] == 40 and 0.9 <= r.quality["recall_at_10"] <= 1.0
        assert 0 < r.quality["p50_ms"] <= r.quality["p99_ms"]
    assert json.loads(open(files.image_infos).read())["index_param"].startswith("nprobe=")
    assert read_report(c["folder"]).metadata()["image_recall_at_10"] == report.image.quality["recall_at_10"]


def test_nprobe_is_lowered_to_the_recall_target_on_other_queries(built):
    """autofaiss's nprobe (the most its max_query_ms allows) is the ceiling; the build keeps the smallest nprobe that
    reaches IndexSettings.target_recall on held-out queries, and measures it on others."""
    _, crawls = built
    for m in ("image", "text"):
        infos = json.loads(open(paths.index_files(crawls["CC-MAIN-2099-01"]["folder"]).infos(m)).read())
        tuned, ceiling = (int(p.split("=")[1]) for p in (infos["index_param"], infos["index_param_autofaiss"]))
        assert infos["target_recall"] == SETTINGS.target_recall == 0.95 and 1 <= tuned <= ceiling


def test_tune_nprobe_finds_the_smallest_nprobe_reaching_the_target():
    import faiss

    from laion_assets.core.index.evaluate import ExactTopK, recall_at_k, tune_nprobe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)).astype(np.float32)  # no clusters: recall grows slowly with nprobe
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + rng.normal(scale=0.3, size=(100, 32)).astype(np.float32)
    exact = ExactTopK(q)
    exact.add(x, 0)
    index = faiss.index_factory(32, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    ivf = faiss.extract_index_ivf(index)

    def recall(nprobe: int) -> float:
        ivf.nprobe = nprobe
        return recall_at_k(index.search(q, 10)[1], exact.ids)

    ivf.nprobe = 32
    nprobe = tune_nprobe(index, q, exact.ids, 0.9)
    assert ivf.nprobe == nprobe and 1 < nprobe < 32 and recall(nprobe) >= 0.9 > recall(nprobe - 1)
    ivf.nprobe = 2  # a ceiling below what the target needs: kept, never raised
    assert tune_nprobe(index, q, exact.ids, 0.9) == 2
    assert tune_nprobe(faiss.IndexFlatIP(32), q, exact.ids, 0.9) is None


def test_row_reader_returns_rows_in_the_asked_order():
    from laion_assets.core.index.metadata import RowReader

    n = 1000
    table = pa.Table.from_batches(pa.table({"key": [f"k{i}" for i in range(n)], "v": list(range(n))})
                                  .to_batches(max_chunksize=64))
    reader = RowReader(table)
    rng = np.random.default_rng(0)
    for ids in ([5], [999, 0, 63, 64, 5, 5], rng.integers(0, n, RowReader.SLICES + 50).tolist()):
        assert reader.rows(ids) == table.take(pa.array(ids)).to_pylist()
        assert reader.rows(ids, ["v"]) == [{"v": i} for i in ids]
    assert reader.rows([]) == []
    for bad in ([n], [-1], [0] * RowReader.SLICES + [n]):
        with pytest.raises(IndexError):
            reader.rows(bad)


def test_metadata_is_row_aligned_and_excludes_removed_rows(built):
    _, crawls = built
    c = crawls["CC-MAIN-2099-01"]
    index = open_index("crawl", c["folder"])
    assert index.metadata.num_rows == index.image.ntotal == index.text.ntotal
    keys = index.metadata["key"].to_pylist()
    assert not set(keys) & c["removed"]
    all_keys = c["table"]["key"].to_pylist()
    # Every kept row's own image vector finds that row first: vector i and metadata row i describe one sample.
    for row in (0, 500, 1500):
        key = keys[row]
        hits = search(index, c["vectors"][all_keys.index(key)], "image", num_result_ids=3)
        assert hits[0].id == row and hits[0].row["key"] == key and hits[0].similarity > 0.99
        assert hits[0].row["URL"] == f"http://example.com/{key}.jpg" and hits[0].row["caption"] == f"caption of {key}"


def test_query_time_removals_and_safety_and_dedup(built):
    _, crawls = built
    c = crawls["CC-MAIN-2099-01"]
    index = open_index("crawl", c["folder"])
    query = c["vectors"][0]
    before = search(index, query, "image", num_result_ids=20)
    gone = {before[0].id, before[3].id}
    after = search(index, query, "image", num_result_ids=20, removed=gone)
    assert len(after) == 20 and not {h.id for h in after} & gone
    safe = search(index, query, "image", num_result_ids=20, where=RowFilter(max_punsafe=0.5))
    assert safe and all(h.row["punsafe"] <= 0.5 for h in safe)
    assert {h.id for h in safe} == {h.id for h in before if h.row["punsafe"] <= 0.5}
    narrow = RowFilter(max_pwatermark=0.6, language="de", min_width=300, min_height=200)
    rows = search(index, query, "image", num_result_ids=20, where=narrow)
    assert {h.id for h in rows} == {h.id for h in before if narrow.passes(h.row)} and len(rows) < 20
    capped = search(index, query, "image", num_result_ids=20, num_images=5)
    assert [h.id for h in capped] == [h.id for h in before[:5]]
    # Dedup drops results whose embedding repeats a better one: a low threshold makes near neighbours "the same".
    loose = search(index, query, "image", num_result_ids=20, deduplicate=True, dedup_threshold=0.5)
    strict = search(index, query, "image", num_result_ids=20, deduplicate=True, dedup_threshold=0.9999)
    assert len(loose) < len(strict) == 20


def test_misaligned_or_incomplete_metadata_is_refused(built, tmp_path):
    store, crawls = built
    c = crawls["CC-MAIN-2099-01"]
    buckets = [paths.bucket_embeddings("CC-MAIN-2099-01", b, paths.Layout(2, 3)) for b in ("0", "1", "2")]
    shuffled = c["table"].take(pa.array(np.roll(np.arange(c["table"].num_rows), 1)))
    with pytest.raises(MetadataError, match="not the keys of"):
        build_index(store, buckets, shuffled, str(tmp_path / "x"), SETTINGS)
    with pytest.raises(MetadataError, match="punsafe"):
        build_index(store, buckets, c["table"].drop_columns(["punsafe"]), str(tmp_path / "y"), SETTINGS)
    with pytest.raises(MetadataError, match="1799 rows"):
        build_index(store, buckets, c["table"].slice(0, 1799), str(tmp_path / "z"), SETTINGS)


def test_merge_on_disk_keeps_every_row_and_its_crawl(built, tmp_path):
    store, crawls = built
    parts = {name: c["folder"] for name, c in crawls.items()}
    out = store.uri(paths.knn_index_all())
    report = merge_indices(parts, out, SETTINGS)
    files = paths.index_files(out)
    assert os.path.getsize(files.ivfdata("image")) > 0 and os.path.getsize(files.ivfdata("text")) > 0
    total = sum(c["report"].rows for c in crawls.values())
    assert report.rows == report.image.vectors == report.text.vectors == total
    assert report.image.index_key.startswith("IVF") and report.image.quality["recall_at_10"] >= 0.9
    # nprobe tuned down to the recall target from nlist / 8 (at least 16), recall measured on other queries.
    with open(files.infos("image")) as f:
        infos = json.load(f)
    assert infos["target_recall"] == SETTINGS.target_recall and infos["index_param_autofaiss"] == "nprobe=16"
    assert 1 <= int(infos["index_param"].split("nprobe=")[1].split(",")[0]) <= 16
    assert report.image.quality["recall_at_10"] >= SETTINGS.target_recall - 0.05
    merged = open_index("all", out)
    assert merged.metadata.num_rows == total
    assert merged.metadata["indice"].to_pylist() == (["CC-MAIN-2099-01"] * crawls["CC-MAIN-2099-01"]["report"].rows
                                                     + ["CC-MAIN-2099-02"] * crawls["CC-MAIN-2099-02"]["report"].rows)
    for name, c in crawls.items():
        keys = c["table"]["key"].to_pylist()
        kept = [k for k in keys if k not in c["removed"]]
        key = kept[123]
        hit = search(merged, c["vectors"][keys.index(key)], "image", num_result_ids=1)[0]
        assert hit.row["key"] == key and hit.row["indice"] == name and hit.similarity > 0.99


def test_a_corrupt_or_unfinished_index_is_unavailable_with_the_reason(built, tmp_path):
    import shutil

    _, crawls = built
    broken = tmp_path / "broken"
    shutil.copytree(crawls["CC-MAIN-2099-02"]["folder"], broken)
    (broken / "text.index").write_bytes(b"not a faiss index")
    with pytest.raises(IndexUnavailable, match="cannot read the index"):
        open_index("broken", str(broken))
    os.remove(broken / "_report.json")
    with pytest.raises(IndexUnavailable, match="not built completely"):
        open_index("broken", str(broken))


def test_autofaiss_runs_beside_numpy_2_and_is_declared():
    """autofaiss pins numpy<2; we install it without its pins (pyproject's [tool.laion_assets]) and run on numpy 2."""
    import tomllib

    import autofaiss
    import faiss

    assert int(np.__version__.split(".")[0]) >= 2 and int(pa.__version__.split(".")[0]) >= 18
    assert autofaiss.__version__ and faiss.IndexFlatIP(4).d == 4
    project = tomllib.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml"), "rb"))
    assert f"autofaiss=={autofaiss.__version__}" in project["tool"]["laion_assets"]["install-no-deps"]


def test_the_index_command_builds_from_a_clip_retrieval_folder(tmp_path):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from laion_assets.cli import main
    from laion_assets_tests.index.worlds import LAYOUT

    store = Storage(str(tmp_path / "data"))
    _, table, _ = mixture_crawl(store, "CC-MAIN-2099-05", rows_per_bucket=200, seed=5)
    pq.write_table(table, tmp_path / "meta.parquet")
    pq.write_table(table.select(["key"]).slice(0, 10), tmp_path / "removed.parquet")
    out = tmp_path / "index"
    result = CliRunner().invoke(main, [
        "index", store.uri(paths.embeddings("CC-MAIN-2099-05", LAYOUT)), "--metadata", str(tmp_path / "meta.parquet"),
        "-o", str(out), "--exclude", str(tmp_path / "removed.parquet"), "--index-key", "IVF8,Flat",
        "--eval-queries", "20"])
    assert result.exit_code == 0, result.output
    assert "rows=590" in result.output and "excluded=10" in result.output and "image_recall_at_10=" in result.output
    assert open_index("cli", str(out)).metadata.num_rows == 590


def test_merge_in_many_small_shards_under_a_tiny_build_budget(built, tmp_path):
    """A part larger than the build budget is spread over several shards before merge_ondisk; nothing is lost."""
    _, crawls = built
    parts = {name: c["folder"] for name, c in crawls.items()}
    report = merge_indices(parts, str(tmp_path / "all"), IndexSettings(build_memory="64K", eval_queries=20))
    merged = open_index("all", str(tmp_path / "all"))
    assert merged.image.ntotal == merged.text.ntotal == report.rows == merged.metadata.num_rows
    assert report.image.quality["recall_at_10"] >= 0.9
    c = crawls["CC-MAIN-2099-02"]
    keys = c["table"]["key"].to_pylist()
    key = [k for k in keys if k not in c["removed"]][-1]  # the last row: in the last shard
    hit = search(merged, c["vectors"][keys.index(key)], "image", num_result_ids=1)[0]
    assert hit.row["key"] == key and hit.row["indice"] == "CC-MAIN-2099-02"


def test_removals_since_the_build_name_rows_not_keys(tmp_path):
    """Keys repeat across buckets and crawls: a removal of one sample hides its row, not another with its key."""
    from laion_assets.core.index import metadata as meta
    from laion_assets.core.index.crawl import removed_since_build
    from laion_assets.core.release import removals as rl

    table = index_metadata(["000000001", "000000001", "000000002"],
                           ["http://a.example/1.jpg", "http://b.example/1.jpg", "http://a.example/2.jpg"],
                           ["one", "other one", "two"], np.random.default_rng(0))
    meta.write_arrow([meta.complete(table)], meta.complete(table).schema, paths.index_files(str(tmp_path)).metadata)
    entries = rl.RemovalList("v000001", (rl.make_entry("url", "http://b.example/1.jpg", "request"),))
    assert removed_since_build(str(tmp_path), entries) == {1}


def test_indices_below_the_recall_floor_are_left_out_of_the_merge(built):
    """knn_index_all merges only crawls whose index passed the recall floor (the blocking check)."""
    from laion_assets.core.index.crawl import below_recall_floor

    store, crawls = built
    assert below_recall_floor(store, sorted(crawls), 0.5) == {}
    low = below_recall_floor(store, sorted(crawls), 1.01)
    assert set(low) == set(crawls) and all(0.5 <= r <= 1.0 for r in low.values())
