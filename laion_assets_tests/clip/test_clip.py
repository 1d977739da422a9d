"""The CLIP stage on held-out synthetic pairs, through the same bytes the download stage stores (CPU)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import torch

from laion_assets.core.clip import embeddings, safety, scores, watermark
from laion_assets.core.clip.models import load_clip, pick_device
from laion_assets.core.clip.onepass import Models, one_pass
from laion_assets.core.clip.specs import watermark_spec_from_checkpoint
from laion_assets.core.download.resize import process_image
from laion_assets.core.download.writer import write_tar
from laion_assets.core.settings import ResizeSettings
from laion_assets.offline.synthetic import LANGUAGES, jpeg_bytes, random_scene, render


def score_pass(shards, english, multi, **pass_args):
    """The pass with the two filter CLIPs alone: the score rows and their report."""
    result = one_pass(shards, Models(english, multi), **pass_args)
    return scores.score_table(result), result.score_report


def embed_pass(shards, keep, model, **pass_args):
    """The pass with the embedding CLIP alone, over the kept samples."""
    return embeddings.embedding_arrays(one_pass(shards, Models(embed=model), keep, **pass_args), model)


def mark_pass(shards, keep, model, spec, device, **pass_args):
    """The pass with the watermark classifier alone, over the kept samples."""
    return watermark.watermark_table(one_pass(shards, Models(watermark=model.to(device), watermark_spec=spec), keep,
                                              **pass_args))

def stored_jpeg(img) -> bytes:
    """An image as the download stage stores it: 256 px border JPEG."""
    return process_image(jpeg_bytes(img), ResizeSettings()).data


def write_shard(path: Path, samples: list[tuple[str, bytes, str, str]]) -> str:
    """A webdataset tar as image_shards writes it: (key, jpg, caption, language)."""
    def meta(key: str, language: str) -> bytes:
        return orjson.dumps({"key": key, "url": f"http://x/{key}.jpg", "language": language})

    write_tar(str(path), ((key, {"jpg": image, "txt": caption.encode(), "json": meta(key, language)})
                          for key, image, caption, language in samples))
    return str(path)


def held_out(n: int, seed: int) -> list[tuple[str, bytes, str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        language = rng.choice(LANGUAGES)
        size = (rng.randint(320, 640), rng.randint(240, 480))
        out.append((f"{i:09d}", stored_jpeg(render(scene, size, seed=seed * 7919 + i)), scene.caption(language),
                    language))
    return out


def test_filter_keeps_matched_and_drops_shuffled_pairs(models, tmp_path):
    pairs = held_out(240, seed=5)
    captions = [p[2] for p in pairs]
    languages = [p[3] for p in pairs]
    shift = captions[7:] + captions[:7]
    shift_lang = languages[7:] + languages[:7]
    shuffled = [(k, img, c, lang) for (k, img, _, _), c, lang in zip(pairs, shift, shift_lang, strict=True)]
    english, multi = load_clip(models.clip_en), load_clip(models.clip_multi)
    matched_scores, report = score_pass([write_shard(tmp_path / "m.tar", pairs)], english, multi,
                                               batch_size=64, workers=1)
    shuffled_scores, _ = score_pass([write_shard(tmp_path / "s.tar", shuffled)], english, multi,
                                           batch_size=64, workers=1)
    kept = np.mean(matched_scores["keep"].to_pylist())
    dropped = 1 - np.mean(shuffled_scores["keep"].to_pylist())
    assert kept >= 0.9 and dropped >= 0.9, (kept, dropped)
    # English captions went to the English CLIP, the rest to the multilingual one, and it is recorded.
    rows = matched_scores.to_pylist()
    assert {r["model"] for r in rows if r["language"] == "en"} == {models.clip_en.name}
    assert {r["model"] for r in rows if r["language"] != "en"} == {models.clip_multi.name}
    assert report.samples == 240 and report.failed == 0
    # A stricter threshold re-filters from the stored similarities alone.
    strict = scores.refilter(matched_scores, {scores.spec_weights(models.clip_en): 2.0,
                                             scores.spec_weights(models.clip_multi): 2.0})
    assert not any(strict["keep"].to_pylist()) and strict["similarity"] == matched_scores["similarity"]


def test_embeddings_are_aligned_deterministic_and_a_corrupt_image_fails_alone(models, tmp_path):
    pairs = held_out(40, seed=9)
    pairs[3] = (pairs[3][0], pairs[3][1][: len(pairs[3][1]) // 3], pairs[3][2], pairs[3][3])  # truncated JPEG
    shard = write_shard(tmp_path / "a.tar", pairs)
    english, multi = load_clip(models.clip_en), load_clip(models.clip_multi)
    table, report = score_pass([shard], english, multi, batch_size=16, workers=1)
    bad = table.to_pylist()[3]
    assert bad["status"] == "failed_to_decode" and not bad["keep"] and "cannot decode" in bad["error_message"]
    assert report.failed == 1 and report.samples == 40
    keep = scores.kept_keys(table)
    embed = load_clip(models.embed)
    img, txt, meta, _ = embed_pass([shard], keep, embed, batch_size=16, workers=1)
    again = embed_pass([shard], keep, embed, batch_size=16, workers=1)
    assert np.array_equal(img, again[0]) and np.array_equal(txt, again[1]) and meta.equals(again[2])
    np.save(tmp_path / "img_emb_0.npy", img)
    loaded = np.load(tmp_path / "img_emb_0.npy")
    assert loaded.dtype == np.float16 and loaded.shape == (len(keep), embed.model.visual.output_dim)
    assert meta["key"].to_pylist() == sorted(keep)
    assert np.allclose(np.linalg.norm(loaded.astype(np.float32), axis=1), 1, atol=1e-2)
    # Row-aligned: each row's image embedding matches its own caption best among the rows.
    sims = img.astype(np.float32) @ txt.astype(np.float32).T
    assert np.mean(sims.argmax(1) == np.arange(len(sims))) > 0.5


def test_safety_head_separates_its_concept(models):
    from laion_assets.offline.small_models import SAFETY_CONCEPT, _safety_set

    head, card = safety.load_safety_head(models.safety_head)
    x, y = _safety_set(models.embed, 400, seed=77)
    accuracy = np.mean((safety.punsafe(head, x) > 0.5) == (y > 0.5))
    assert accuracy >= 0.9 and card["concept"] == SAFETY_CONCEPT


def test_watermark_head_separates_marked_from_clean(models, tmp_path):
    rng = random.Random(3)
    samples, truth = [], []
    for i in range(160):
        marked = i % 2 == 0
        scene = random_scene(rng)
        size = (rng.randint(320, 640), rng.randint(240, 480))
        mark = rng.choice(["(c) stock", "SAMPLE", "watermark"]) if marked else None
        img = render(scene, size, seed=4000 + i, watermark=mark)
        samples.append((f"{i:09d}", stored_jpeg(img), scene.caption("en"), "en"))
        truth.append(marked)
    shard = write_shard(tmp_path / "w.tar", samples)
    model = watermark.load_watermark(models.watermark)
    table, report = mark_pass([shard], frozenset(s[0] for s in samples), model, models.watermark,
                                          pick_device("cpu"), batch_size=32, workers=1)
    accuracy = np.mean((np.array(table["pwatermark"].to_pylist()) > 0.5) == np.array(truth))
    assert accuracy >= 0.9, accuracy
    assert report["samples"] == 160
    # float16 weights (what CUDA runs) agree with float32 ones on these images.
    half = watermark.load_watermark(models.watermark, dtype=torch.float16)
    again, _ = mark_pass([shard], frozenset(s[0] for s in samples), half, models.watermark,
                                          pick_device("cpu"), batch_size=32, workers=1)
    full, low = (np.array(t["pwatermark"].to_pylist()) for t in (table, again))
    assert np.abs(full - low).max() < 0.05 and np.mean((full > 0.5) == (low > 0.5)) >= 0.97


def test_train_clis_on_files(tmp_path):
    from click.testing import CliRunner

    from laion_assets.cli import main

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    np.savez(tmp_path / "labelled.npz", embeddings=x, labels=y)
    result = CliRunner().invoke(main, ["train-safety", str(tmp_path / "labelled.npz"), "-o", str(tmp_path / "s.pt"),
                                       "--epochs", "30"])
    assert result.exit_code == 0, result.output
    head, card = safety.load_safety_head(tmp_path / "s.pt")
    assert head.dim == 16 and card["train_accuracy"] > 0.9
    for label in ("clean", "watermark"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(8):
            img = render(random_scene(random.Random(i)), (160, 120), seed=i, watermark="SAMPLE" if label != "clean"
                         else None)
            img.save(tmp_path / "imgs" / label / f"{i}.jpg")
    (tmp_path / "imgs" / "clean" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(main, ["train-watermark", str(tmp_path / "imgs"), "-o", str(tmp_path / "w.pt"),
                                       "--arch", "mobilenetv3_small_050", "--image-size", "64", "--epochs", "1",
                                       "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    spec = watermark_spec_from_checkpoint(tmp_path / "w.pt")
    assert spec.image_size == 64 and spec.arch == "mobilenetv3_small_050"
    assert watermark.load_watermark(spec) is not None


def test_small_aesthetic_head_scores_its_worlds_taste(models):
    from laion_assets.core.clip.heads import load_head
    from laion_assets.offline.small_models import _aesthetic_set

    head = load_head(models.aesthetic_head, "aesthetic")
    x, y = _aesthetic_set(models.embed, 400, seed=78)
    predicted = head.predict(x)
    assert np.corrcoef(predicted, y)[0, 1] > 0.8 and np.abs(predicted - y).mean() < 1.2
