"""The CLIP stage's one pass: the same scores, keeps, embeddings and watermark scores as a pass per model (CPU)."""

from __future__ import annotations

import numpy as np

from laion_assets.core.clip import embeddings, scores, watermark
from laion_assets.core.clip.models import load_clip
from laion_assets.core.clip.onepass import Models, one_pass
from laion_assets_tests.clip.test_clip import held_out, write_shard


def test_one_pass_equals_a_pass_per_model(models, tmp_path):
    pairs = held_out(60, seed=21)
    pairs[4] = (pairs[4][0], pairs[4][1][:150], pairs[4][2], pairs[4][3])  # truncated JPEG
    pairs[30] = (pairs[30][0], b"not an image", pairs[30][2], pairs[30][3])
    shards = [write_shard(tmp_path / "a.tar", pairs[:35]), write_shard(tmp_path / "b.tar", pairs[35:])]
    english, multi, embed = load_clip(models.clip_en), load_clip(models.clip_multi), load_clip(models.embed)
    mark = watermark.load_watermark(models.watermark)
    # A pass per model, as the stage ran before.
    table = scores.score_table(one_pass(shards, Models(english, multi), batch_size=16, workers=1))
    keep = scores.kept_keys(table)
    assert 0 < len(keep) < len(pairs)
    img, txt, meta, _ = embeddings.embedding_arrays(one_pass(shards, Models(embed=embed), keep, batch_size=16,
                                                             workers=1), embed)
    marks, _ = watermark.watermark_table(one_pass(shards, Models(watermark=mark, watermark_spec=models.watermark),
                                                  keep, batch_size=16, workers=1))
    # One pass: every image decoded once for the three models.
    result = one_pass(shards, Models(english, multi, embed, mark, models.watermark), batch_size=16, workers=1)
    one_table = scores.score_table(result)
    one_img, one_txt, one_meta, report = embeddings.embedding_arrays(result, embed)
    one_marks, mark_report = watermark.watermark_table(result)
    # Similarities, keeps, statuses: identical (PIL's error names the BytesIO's address: only its start is).
    assert one_table.drop_columns(["error_message"]).equals(table.drop_columns(["error_message"]))
    failed = [r for r in one_table.to_pylist() if r["status"] == "failed_to_decode"]
    assert [r["key"] for r in failed] == [pairs[4][0], pairs[30][0]] and not any(r["keep"] for r in failed)
    assert [r["error_message"][:40] for r in failed] == [r["error_message"][:40] for r in table.to_pylist()
                                                          if r["status"] == "failed_to_decode"]
    assert one_meta.equals(meta) and report.kept == len(keep) and report.failed == 0
    assert np.array_equal(one_img, img) and np.array_equal(one_txt, txt)  # the same batches of kept samples
    assert one_marks.equals(marks) and mark_report["samples"] == len(keep)
    # Without scoring, the pass reads only the kept samples and gives the same embeddings.
    kept_only = one_pass(shards, Models(embed=embed), keep, batch_size=16, workers=1)
    assert np.array_equal(embeddings.embedding_arrays(kept_only, embed)[0], img)
    assert kept_only.embed_report.samples == len(keep) and not kept_only.score_rows


def test_the_pass_materializes_in_part_and_a_threshold_change_refilters(tmp_path):
    import dagster as dg

    from laion_assets.core.clip.registry import save_overrides
    from laion_assets.core.settings import SAMPLE_CRAWL
    from laion_assets_tests.graph import CLIP_PASS, Graph, graph_resources

    graph = Graph(graph_resources(str(tmp_path / "data"), tmp_path / "mirror"))
    graph.whole_crawl(tmp_path / "mirror", sample={"wat_files": 1, "pages_per_file": 6})
    bucket = dg.MultiPartitionKey({"crawl": SAMPLE_CRAWL, "bucket": "0000"})
    kept = graph.meta["clip_scores"][0]["kept"]
    # A new watermark model re-runs watermark_scores alone, on the stored scores' kept samples.
    graph.run("watermark_scores", bucket)
    assert len(graph.meta["clip_scores"]) == 2 and graph.meta["watermark_scores"][-1]["samples"] == kept
    # A stricter threshold: clip_scores re-filtered without decoding, and its dependants follow in the same run.
    save_overrides(graph.resources["storage"].get(), {"threshold_en": 0.99, "threshold_multi": 0.99}, "test")
    graph.run(CLIP_PASS[0], bucket, also=CLIP_PASS[1:])
    scores = graph.meta["clip_scores"][-1]
    assert scores["refiltered_only"] is True and scores["kept"] < kept
    assert graph.meta["image_embeddings"][-1]["dagster/row_count"] == scores["kept"]
    assert graph.meta["watermark_scores"][-1]["samples"] == scores["kept"]
