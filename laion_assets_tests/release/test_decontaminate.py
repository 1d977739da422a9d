"""Evaluation-set decontamination and the removals' neighbour sweep on a small released and indexed crawl: matches
by sha256, pHash and cosine written as eval:<name> sha256 entries, unreadable evaluation files named, the
evaluation set's stored copy reused, embeddings of another model refused naming both; the sweep's candidates around
removed samples, --add, and an empty list."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from laion_assets.cli import main
from laion_assets.core import paths
from laion_assets.core.clip.embeddings import EmbeddingModelMismatch, write_embeddings
from laion_assets.core.release import decontaminate, sweep
from laion_assets.core.release import removals as rl
from laion_assets.core.settings import DecontaminationSettings, ModelSettings, SweepSettings
from laion_assets.core.storage import Storage
from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render
from laion_assets_tests.conftest import MODELS_DIR
from laion_assets_tests.release.eval_world import CRAWL, LAYOUT, TWIN, TWIN_COPY, build_world

MODELS = ModelSettings(models_dir=str(MODELS_DIR))
COPY, REQUALITY, FLIPPED = "0000/000001", "0001/000002", "0000/000007"


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    from laion_assets.core.clip.models import load_clip
    from laion_assets.core.clip.registry import resolve

    model = load_clip(resolve(MODELS, check=False).embed)
    root = tmp_path_factory.mktemp("eval-world") / "data"
    return build_world(str(root), model), model


@pytest.fixture
def world(built, tmp_path):
    """A fresh copy of the world for each test (decontamination and sweeps write removal versions)."""
    w, _ = built
    root = tmp_path / "data"
    shutil.copytree(w.root, root)
    return type(w)(str(root), Storage(str(root)), w.model_name, w.originals, w.renders, w.rows, w.vectors)


def eval_folder(world, folder) -> str:
    """The crawl's image 0000/000001 byte for byte, 0001/000002 re-encoded (same pHash), 0000/000007 mirrored (only
    the embedding says it is the same picture), a picture the crawl does not have, and two unreadable files."""
    os.makedirs(folder)
    files = {"copy.jpg": world.originals[COPY], "requality.jpg": jpeg_bytes(world.renders[REQUALITY], quality=60),
             "sub/flipped.jpg": jpeg_bytes(world.renders[FLIPPED].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
             "fresh.jpg": jpeg_bytes(render(random_scene(random.Random(5)), (160, 120), seed=4242)),
             "broken.jpg": b"\xff\xd8\xff not really a JPEG", "notes.txt": b"the labels are elsewhere"}
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return str(folder)


def test_an_image_folder_matches_by_each_kind_and_names_its_unreadable_files(world, tmp_path):
    source = eval_folder(world, tmp_path / "eval")
    runner = CliRunner()
    args = ["decontaminate", source, "--name", "testset", "--storage", world.root, "--models-dir", str(MODELS_DIR),
            "--matches", str(tmp_path / "matches.parquet")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 evaluation images (2 unreadable)" in result.output
    assert "3 released samples matched in 1 crawls (sha256 1, phash 1, cosine 1)" in result.output
    assert "unreadable: broken.jpg" in result.output and "unreadable: notes.txt" in result.output
    entries = rl.load(world.store).entries
    assert {e.kind for e in entries} == {"sha256"} and {e.reason for e in entries} == {"eval:testset"}
    assert {e.value for e in entries} == {world.rows[k]["sha256"] for k in (COPY, REQUALITY, FLIPPED)}
    matches = pl.read_parquet(tmp_path / "matches.parquet")
    first = matches.unique(["crawl", "key", "URL"], keep="first", maintain_order=True)
    assert dict(zip(first["eval"], first["kind"], strict=True)) == {
        "copy.jpg": "sha256", "requality.jpg": "phash", "sub/flipped.jpg": "cosine"}
    assert "fresh.jpg" not in matches["eval"].to_list()
    assert matches.filter(pl.col("kind") == "cosine")["similarity"].min() >= 0.95
    # Checked again (the next crawl, a rerun): the stored hashes and embeddings, nothing new to write.
    report, _ = decontaminate.run(world.store, source, "testset", DecontaminationSettings(), MODELS,
                                  loader=lambda _: pytest.fail("the evaluation set was embedded again"))
    assert report.cached and report.samples == 3 and report.entries_added == 0 and report.already_listed == 3
    assert rl.versions(world.store) == [1] and report.unreadable.keys() == {"broken.jpg", "notes.txt"}


def test_a_webdataset_is_an_evaluation_source_and_a_dry_run_writes_nothing(world, built, tmp_path):
    tar_path = tmp_path / "eval-00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("s0.jpg", world.originals[COPY]), ("s0.cls", b"7"), ("s1.png", b"\x89PNG broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report, matches = decontaminate.run(world.store, str(tar_path), "tars", DecontaminationSettings(), MODELS,
                                        dry_run=True, loader=lambda _: built[1])
    assert report.kind == "webdataset" and report.images == 1 and list(report.unreadable) == ["eval-00000.tar:s1.png"]
    assert report.matches["sha256"] == 1 and report.entries_added == 1 and report.version == ""
    assert rl.versions(world.store) == []
    for source, name in ((str(tar_path), "../up"), (str(tmp_path / "nothing"), "x"), (str(tmp_path / "no.tar"), "x")):
        with pytest.raises(decontaminate.EvaluationSourceError):
            decontaminate.run(world.store, source, name, DecontaminationSettings(), MODELS)


def _embeddings_folder(folder, vectors: np.ndarray, model: str) -> str:
    n = len(vectors)
    write_embeddings(Storage(str(folder)), paths.embedding_files("", 0), vectors.astype(np.float16),
                     vectors.astype(np.float16), pa.table({"key": [f"e{i}" for i in range(n)],
                                                           "url": [""] * n, "caption": [""] * n,
                                                           "language": [""] * n, "model": [model] * n}))
    return str(folder)


def test_an_embeddings_folder_matches_by_cosine_and_another_models_is_refused(world, tmp_path):
    rng = np.random.default_rng(0)
    # The sample farthest from every other one: its neighbour is itself alone at 0.95.
    keys = sorted(world.vectors)
    sims = np.stack([world.vectors[k] for k in keys]) @ np.stack([world.vectors[k] for k in keys]).T
    np.fill_diagonal(sims, -1)
    lonely = keys[int(np.argmin(sims.max(axis=1)))]
    near = world.vectors[lonely] + 0.01 * rng.normal(size=world.vectors[lonely].shape)
    source = _embeddings_folder(tmp_path / "emb", near[None, :], world.model_name)
    report, matches = decontaminate.run(world.store, source, "embedded", DecontaminationSettings(), MODELS)
    assert report.kind == "embeddings" and report.matches == {"sha256": 0, "phash": 0, "cosine": 1}
    assert matches["key"].to_list() == [lonely.split("/")[1]] and report.version == "v000001"
    other = _embeddings_folder(tmp_path / "other", near[None, :], "ViT-L-14/openai")
    with pytest.raises(EmbeddingModelMismatch, match=f"{world.model_name}.*ViT-L-14/openai"):
        decontaminate.run(world.store, other, "embedded", DecontaminationSettings(), MODELS)
    wider = _embeddings_folder(tmp_path / "wider", rng.normal(size=(2, 48)), "")
    result = CliRunner().invoke(main, ["decontaminate", wider, "--name", "x", "--storage", world.root])
    assert result.exit_code != 0 and "48-d" in result.output and world.model_name in result.output


def test_the_sweep_reaches_the_neighbours_of_removed_samples_and_adds_them(world, tmp_path):
    runner = CliRunner()
    review = str(tmp_path / "review.parquet")
    sweep_args = ["removals", "sweep", "--storage", world.root, "--buckets", str(LAYOUT.buckets), "-o", review]
    result = runner.invoke(main, sweep_args)
    assert result.exit_code != 0 and "nothing to sweep" in result.output
    twin, copy = "/".join(TWIN), "/".join(TWIN_COPY)
    rl.add(world.store, [rl.make_entry("sha256", world.rows[twin]["sha256"], "reported")])
    result = runner.invoke(main, [*sweep_args, "--add"])
    assert result.exit_code != 0 and "--reason" in result.output and rl.versions(world.store) == [1]
    result = runner.invoke(main, sweep_args)
    assert result.exit_code == 0, result.output
    assert "1 removed samples embedded" in result.output and "1 candidates" in result.output
    rows = pl.read_parquet(review)
    assert rows["key"].to_list() == [TWIN_COPY[1]] and rows["removed_key"].to_list() == [TWIN[1]]
    assert rows["URL"].to_list() == [world.rows[copy]["URL"]] and rows["similarity"][0] >= 0.9
    assert rows["removed_rule"][0] == f"sha256:{world.rows[twin]['sha256']}" and rows["crawl"][0] == CRAWL
    assert not [c for c, t in rows.schema.items() if t == pl.Binary]  # never image bytes
    result = runner.invoke(main, [*sweep_args, "--add", "--reason", "near a reported image"])
    assert result.exit_code == 0 and "added as v000002" in result.output, result.output
    added = rl.added_in(world.store, 2).entries
    assert [(e.kind, e.value, e.reason) for e in added] == [("sha256", world.rows[copy]["sha256"],
                                                             "near a reported image")]
    # The neighbours of what v2 removed are removed already: nothing new.
    report, rows = sweep.run(world.store, LAYOUT, SweepSettings(), version=2)
    assert report.removed_samples == 1 and report.candidates == 0 and rows.height == 0
    # A URL entry is matched against the embeddings' URLs (no download rows needed).
    rl.add(world.store, [rl.make_entry("url", world.rows[COPY]["URL"], "url report")])
    report, _ = sweep.run(world.store, LAYOUT, SweepSettings())
    assert report.version == "v000003" and report.removed_samples == 1 and report.entries_without_samples == 0
    with pytest.raises(KeyError):
        sweep.run(world.store, LAYOUT, SweepSettings(), version=7)


def test_the_decontamination_asset_checks_a_crawl_against_the_registered_sets(world, tmp_path):
    from laion_assets_tests.graph import Graph, graph_resources

    source = eval_folder(world, tmp_path / "eval")
    graph = Graph(graph_resources(world.root, tmp_path, {"LAION_ASSETS_MODELS_DIR": str(MODELS_DIR)}))
    graph.instance.add_dynamic_partitions("crawls", [CRAWL])
    graph.run("decontamination", CRAWL, {"eval_sets": [f"testset={source}"], "min_similarity": 0.95})
    meta = graph.meta["decontamination"][-1]
    assert meta["evaluation_sets"] == 1 and meta["testset/samples"] == 3 and meta["testset/unreadable"] == 2
    assert meta["testset/removal_version"] == "v000001"
    assert json.loads(world.store.read_bytes(paths.removal_version(1)).splitlines()[0])["reason"] == "eval:testset"
