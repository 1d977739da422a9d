"""The CLIP stage's files: embeddings that cannot be mixed across writes, score reuse decided on image bytes and
weights, and the `laion-assets clip` commands on a finished download."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core import paths
from laion_assets.core.clip import embeddings, scores
from laion_assets.core.clip.models import ClipSpec
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.download.distributor import run as download
from laion_assets.core.settings import DownloadSettings, FetchSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import LANGUAGES, jpeg_bytes, random_scene, render
from laion_assets_tests.conftest import MODELS_DIR


def arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(n, 8)).astype(np.float16), rng.normal(size=(n, 8)).astype(np.float16)
    meta = pa.table({"key": [f"{i:06d}" for i in range(n)], "url": ["u"] * n, "caption": ["c"] * n,
                     "language": ["en"] * n})
    return img, txt, meta


def test_a_crash_between_the_embedding_files_never_reads_as_complete(tmp_path, monkeypatch):
    store = Storage(str(tmp_path))
    keys = paths.embedding_files("emb", 0)
    embeddings.write_embeddings(store, keys, *arrays(5, 0))
    img, txt, meta = embeddings.read_embeddings(store, keys)
    assert img.shape == (5, 8) and meta.num_rows == 5

    real_write = Storage.write_bytes

    def dies_after_the_image_array(self, key, data):
        real_write(self, key, data)
        if key == keys.img:
            raise KeyboardInterrupt  # killed between the files

    monkeypatch.setattr(Storage, "write_bytes", dies_after_the_image_array)
    with pytest.raises(KeyboardInterrupt):
        embeddings.write_embeddings(store, keys, *arrays(7, 1))
    monkeypatch.undo()
    with pytest.raises(embeddings.IncompleteEmbeddingsError, match="missing"):
        embeddings.read_embeddings(store, keys)
    # Arrays replaced behind the metadata's back (the old writer's failure mode) are refused too.
    embeddings.write_embeddings(store, keys, *arrays(7, 1))
    store.write_bytes(keys.img, (tmp_path / keys.img).read_bytes()[:-16] + bytes(16))
    with pytest.raises(embeddings.IncompleteEmbeddingsError, match="not the ones"):
        embeddings.read_embeddings(store, keys)
    embeddings.write_embeddings(store, keys, *arrays(7, 1))
    assert embeddings.read_embeddings(store, keys)[0].shape == (7, 8)


def test_misaligned_embeddings_are_refused_before_anything_is_written(tmp_path):
    img, txt, meta = arrays(5, 0)
    with pytest.raises(ValueError, match="not row-aligned"):
        embeddings.write_embeddings(Storage(str(tmp_path)), paths.embedding_files("", 0), img, txt[:4], meta)
    assert not list(tmp_path.iterdir())


def perturbed_copy(spec: ClipSpec, folder) -> ClipSpec:
    """The same file name and card, other weights: what a retrained checkpoint looks like."""
    folder.mkdir()
    path = folder / "small-clip-en.pt"
    state = torch.load(spec.pretrained, map_location="cpu", weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 0.01
    torch.save(state, path)
    shutil.copy(spec.pretrained + ".json", str(path) + ".json")
    return ClipSpec.from_checkpoint(path)


def test_reuse_is_decided_on_image_bytes_and_weights_not_names(models, tmp_path):
    current = pa.table({"key": ["a", "b"], "sha256": ["1" * 64, "2" * 64], "language": ["en", "de"]})
    en, multi = scores.spec_weights(models.clip_en), scores.spec_weights(models.clip_multi)
    previous = pa.table({
        "key": ["a", "b"], "url": ["u", "v"], "caption": ["x", "y"], "language": ["en", "de"],
        "sha256": ["1" * 64, "2" * 64], "model": [models.clip_en.name, models.clip_multi.name], "weights": [en, multi],
        "similarity": pa.array([0.5, 0.1], pa.float32()), "threshold": pa.array([0.3, 0.3], pa.float32()),
        "keep": [True, False], "status": ["scored"] * 2, "error_message": pa.nulls(2, pa.string())},
        schema=scores.SCORE_SCHEMA)
    assert scores.can_reuse(previous, current, models)
    changed_bytes = current.set_column(1, "sha256", pa.array(["1" * 64, "3" * 64]))
    assert not scores.can_reuse(previous, changed_bytes, models)
    other = perturbed_copy(models.clip_en, tmp_path / "retrained")
    assert other.name == models.clip_en.name and scores.spec_weights(other) != en
    retrained = ModelSet(other, models.clip_multi, models.embed, models.safety_head, models.watermark)
    assert not scores.can_reuse(previous, current, retrained)
    random_weights = ModelSet(ClipSpec("x", "laion-assets-small", ""), models.clip_multi, models.embed, "",
                              models.watermark)
    assert not scores.can_reuse(previous, current, random_weights)


@pytest.fixture
def finished_download(loopback, tmp_path, models):
    rng = np.random.default_rng(0)
    urls, captions, languages = [], [], []
    import random

    r = random.Random(4)
    for i in range(24):
        scene = random_scene(r)
        language = LANGUAGES[i % 4]
        loopback.static(f"/{i}.jpg", jpeg_bytes(render(scene, (int(rng.integers(320, 480)), 300), seed=i)))
        urls.append(f"{loopback.base}/{i}.jpg")
        captions.append(scene.caption(language) if i % 6 else "an unrelated caption about taxes")
        languages.append(language)
    pq.write_table(pa.table({"url": urls, "caption": captions, "language": languages}), tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    download(str(tmp_path / "urls.parquet"), Storage(str(out)), "",
             DownloadSettings(samples_per_shard=10, fetch=FetchSettings(allow_networks=("127.0.0.1/32",))))
    return out


def test_clip_commands_on_a_finished_download(finished_download, tmp_path):
    run = CliRunner().invoke
    models = ["--models-dir", str(MODELS_DIR)]
    out = tmp_path / "scores.parquet"
    result = run(main, ["clip", "score", str(finished_download), "-o", str(out), *models])
    assert result.exit_code == 0, result.output
    assert "24 samples" in result.output and "re-filtered" not in result.output
    table = pq.read_table(out)
    assert table.num_rows == 24 and set(table["status"].to_pylist()) == {"scored"}
    assert all(len(s) == 64 for s in table["sha256"].to_pylist())
    # The same weights on the same images: only the thresholds are re-applied.
    result = run(main, ["clip", "score", str(finished_download), "-o", str(out), *models, "--threshold-en", "2"])
    assert result.exit_code == 0 and "re-filtered" in result.output, result.output
    strict = pq.read_table(out)
    assert strict["similarity"].equals(table["similarity"])
    assert not any(k for k, lang in zip(strict["keep"].to_pylist(), strict["language"].to_pylist(), strict=True)
                   if lang == "en")
    result = run(main, ["clip", "score", str(finished_download), "-o", str(out), *models])
    assert result.exit_code == 0, result.output
    kept = sum(pq.read_table(out)["keep"].to_pylist())
    assert 0 < kept < 24
    emb = tmp_path / "emb"
    result = run(main, ["clip", "embed", str(finished_download), "--scores", str(out), "-o", str(emb), *models])
    assert result.exit_code == 0, result.output
    img, txt, meta = embeddings.read_embeddings(Storage(str(emb)), paths.embedding_files("", 0))
    assert img.shape[0] == txt.shape[0] == meta.num_rows == kept
    # The files name their model, so an index built on them can refuse another model's queries (the neighbour
    # search, decontamination) and the service's extras apply to it.
    assert embeddings.embedding_model(meta) == "small-clip-multi"
    result = run(main, ["clip", "safety", str(emb), "-o", str(tmp_path / "safety.parquet"), *models])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "safety.parquet")["key"].equals(meta["key"])
    result = run(main, ["clip", "watermark", str(finished_download), "--scores", str(out), "-o",
                        str(tmp_path / "wm.parquet"), *models])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "wm.parquet").num_rows == kept


def test_clip_run_makes_every_part_in_one_pass_and_refuses_what_it_cannot_do(finished_download, tmp_path):
    run = CliRunner().invoke
    models = ["--models-dir", str(MODELS_DIR)]
    scores_out, emb, marks = tmp_path / "s.parquet", tmp_path / "emb", tmp_path / "w.parquet"
    result = run(main, ["clip", "run", str(finished_download), "--scores", str(scores_out), "--embeddings-dir",
                        str(emb), "--watermark", str(marks), *models])
    assert result.exit_code == 0, result.output
    kept = sum(pq.read_table(scores_out)["keep"].to_pylist())
    assert "24 samples" in result.output and 0 < kept < 24
    assert embeddings.read_embeddings(Storage(str(emb)), paths.embedding_files("", 0))[2].num_rows == kept
    assert pq.read_table(marks).num_rows == kept
    result = run(main, ["clip", "run", str(finished_download), "--scores", str(scores_out), "--no-score", *models])
    assert result.exit_code == 1 and "nothing to compute" in result.output
    result = run(main, ["clip", "run", str(finished_download), "--scores", str(tmp_path / "none.parquet"),
                        "--no-score", "--watermark", str(marks), *models])
    assert result.exit_code == 1 and "no scores at" in result.output


def test_clip_commands_refuse_an_unfinished_download(finished_download, tmp_path):
    (finished_download / "_manifest.json").unlink()
    result = CliRunner().invoke(main, ["clip", "score", str(finished_download), "-o", str(tmp_path / "s.parquet"),
                                       "--models-dir", str(MODELS_DIR)])
    assert result.exit_code == 1 and "_manifest.json is missing" in result.output, result.output
