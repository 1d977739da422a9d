"""LAION's own models as published (../shared/realmodels): the AutoKeras NSFW detector read without TensorFlow
agrees with LAION's PyTorch port, every format is recognised from its content, damaged files are refused, LAION's
aesthetic predictors and watermark model compute what their recipes say, and embeddings that clip-retrieval wrote
are scored as ours are."""

from __future__ import annotations

import io
import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from laion_assets.cli import main
from laion_assets.core.clip.heads import HeadDimensionError, HeadError, LaionNsfwHead, load_head
from laion_assets.core.clip.tfbundle import BundleError

PAIRS = {768: ("clip_autokeras_binary_nsfw.zip", "clip_ViT-L-14_openai_binary_nsfw_head.pth", "vit_l_14"),
         512: ("clip_autokeras_nsfw_b32.zip", "clip_ViT-B-32_openai_binary_nsfw_head.pth", "vit_b_32")}


def clip_like(realmodels, sub: str, dim: int, n: int = 600, seed: int = 0) -> np.ndarray:
    """Unit vectors in and near CLIP's embedding space: LAION's real rating embeddings and violence prompts, those
    moved a little and a lot, and random directions."""
    real = np.concatenate([np.load(realmodels / f"aesthetic/v1/{sub}_embeddings/rating{k}.npy") for k in range(10)]
                          + [np.load(realmodels / f"nsfw/violence_detection_{sub}.npy")])
    rng = np.random.default_rng(seed)
    near = real[rng.integers(0, len(real), n)] + rng.choice([0.02, 0.05, 0.1], (n, 1)) * rng.normal(size=(n, dim))
    x = np.concatenate([real, near, rng.normal(size=(n // 2, dim))]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [768, 512])
def test_autokeras_and_the_pytorch_port_give_the_same_punsafe(realmodels, dim):
    autokeras, port, sub = PAIRS[dim]
    original = load_head(realmodels / "nsfw" / autokeras, "safety")
    ported = load_head(realmodels / "nsfw" / port, "safety")
    assert (original.format, ported.format) == ("laion-nsfw-autokeras", "laion-nsfw-pytorch")
    assert original.dim == ported.dim == dim and original.embedding_model == ported.embedding_model
    x = clip_like(realmodels, sub, dim)
    a, b = original.predict(x), ported.predict(x)
    difference = float(np.abs(a - b).max())
    print(f"{autokeras} vs {port}: max |punsafe difference| {difference:.2e} over {len(x)} embeddings")
    assert difference < 1e-5 and a.min() < 0.01 and a.max() > 0.5  # both ends of the range were exercised
    # LAION's port module as published feeds the AutoKeras model's categorical columns their raw values: what the
    # head evaluates differently (heads.py), and why.
    state = torch.load(realmodels / "nsfw" / port, map_location="cpu", weights_only=True)
    head = LaionNsfwHead(state)
    assert int(head.categorical.sum()) == (5 if dim == 768 else 3)
    head.categorical.zero_()
    with torch.inference_mode():
        raw = head(torch.from_numpy(x)).numpy()
    assert np.abs(raw - a).max() > 1e-5


def test_formats_are_recognised_from_the_content_not_the_name(realmodels, models, tmp_path):
    swapped = {"nsfw.pth": realmodels / "nsfw/clip_autokeras_binary_nsfw.zip",
               "nsfw.zip": realmodels / "nsfw/clip_ViT-L-14_openai_binary_nsfw_head.pth",
               "aesthetic.zip": realmodels / "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth",
               "linear.bin": realmodels / "aesthetic/v1/sa_0_4_vit_l_14_linear.pth"}
    for name, source in swapped.items():
        shutil.copy(source, tmp_path / name)
    assert load_head(tmp_path / "nsfw.pth", "safety").format == "laion-nsfw-autokeras"
    assert load_head(tmp_path / "nsfw.zip", "safety").format == "laion-nsfw-pytorch"
    assert load_head(tmp_path / "aesthetic.zip", "aesthetic").format == "laion-aesthetic-v2"
    assert load_head(tmp_path / "linear.bin", "aesthetic").format == "laion-aesthetic-v1"
    # The unzipped SavedModel folder too, and heads trained here (train-safety, small-models) as before.
    with zipfile.ZipFile(realmodels / "nsfw/clip_autokeras_nsfw_b32.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    assert load_head(tmp_path / "unzipped/clip_autokeras_nsfw_b32", "safety").dim == 512
    ours = load_head(models.safety_head, "safety")
    assert ours.format == "laion-assets" and ours.embedding_model == models.embed.name
    assert load_head(models.aesthetic_head, "aesthetic").format == "laion-assets"
    with pytest.raises(HeadError, match="aesthetic head, not a safety head"):
        load_head(tmp_path / "aesthetic.zip", "safety")


def test_damaged_head_files_are_refused_with_their_path(realmodels, tmp_path):
    good = (realmodels / "nsfw/clip_autokeras_nsfw_b32.zip").read_bytes()
    (tmp_path / "truncated.zip").write_bytes(good[: len(good) // 2])
    with pytest.raises(HeadError, match="truncated.zip"):
        load_head(tmp_path / "truncated.zip", "safety")
    # One flipped byte inside the weights: the bundle's crc32c refuses it.
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(tmp_path / "flipped.zip", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("variables.data-00000-of-00001"):
                data = data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:]
            dst.writestr(item, data)
    with pytest.raises(HeadError, match="crc32c"):
        load_head(tmp_path / "flipped.zip", "safety")
    port = (realmodels / "nsfw/clip_ViT-L-14_openai_binary_nsfw_head.pth").read_bytes()
    (tmp_path / "short.pth").write_bytes(port[:-4000])
    with pytest.raises(HeadError, match="short.pth: not a readable safety head"):
        load_head(tmp_path / "short.pth", "safety")
    with pytest.raises(BundleError, match="table magic"):
        from laion_assets.core.clip.tfbundle import read_index

        read_index(b"\0" * 100)


def test_laion_aesthetic_predictors_rank_laions_rating_embeddings(realmodels):
    ratings = np.concatenate([np.load(realmodels / f"aesthetic/v1/vit_l_14_embeddings/rating{k}.npy")
                              for k in range(10)])
    v2 = load_head(realmodels / "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth", "aesthetic").predict(ratings)
    v1 = load_head(realmodels / "aesthetic/v1/sa_0_4_vit_l_14_linear.pth", "aesthetic").predict(ratings)
    assert np.all(np.diff(v2) > 0) and np.all(np.diff(v1) > 0)  # rating 0 to 9: higher and higher
    assert 1 < v2[0] < 3 and 5 < v2[-1] < 7
    # V2 on the L2-normalised embedding, as its recipe says: the scale of the input does not matter.
    head = load_head(realmodels / "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth", "aesthetic")
    assert np.allclose(head.predict(ratings * 3.0), v2, atol=1e-5)


def clip_retrieval_folder(root, dim: int, n: int, seed: int = 0, rows: int | None = None):
    """Embeddings as clip-retrieval writes them: img_emb/img_emb_0.npy (float16), metadata/metadata_0.parquet with
    its own columns and none of our sha256 tags."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
    m = n if rows is None else rows
    pq.write_table(pa.table({"image_path": [f"{i:09d}" for i in range(m)], "caption": ["a caption"] * m,
                             "url": [f"http://x/{i}.jpg" for i in range(m)]}), root / "metadata" / "metadata_0.parquet")
    return x


def test_clip_retrieval_embeddings_are_scored_by_the_cli(realmodels, tmp_path):
    x = clip_retrieval_folder(tmp_path / "emb", 768, 40)
    run = CliRunner().invoke
    result = run(main, ["clip", "safety", str(tmp_path / "emb"), "-o", str(tmp_path / "safety.parquet"),
                        "--safety-head", str(realmodels / "nsfw/clip_autokeras_binary_nsfw.zip"),
                        "--preset", "laion", "--concepts", "none", "--models-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    safety = pq.read_table(tmp_path / "safety.parquet")
    assert safety.num_rows == 40 and safety["key"][3].as_py() == "000000003"
    expected = load_head(realmodels / "nsfw/clip_ViT-L-14_openai_binary_nsfw_head.pth", "safety").predict(
        x.astype(np.float16))
    assert np.abs(np.array(safety["punsafe"].to_pylist()) - expected).max() < 1e-5
    result = run(main, ["clip", "aesthetic", str(tmp_path / "emb"), "-o", str(tmp_path / "aesthetic.parquet"),
                        "--aesthetic-head", str(realmodels / "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth"),
                        "--preset", "laion", "--concepts", "none", "--models-dir", str(tmp_path / "none")])
    assert result.exit_code == 0 and ">= 4.5" in result.output, result.output
    assert pq.read_table(tmp_path / "aesthetic.parquet").num_rows == 40
    # Without our tags the rows and shapes are still checked.
    clip_retrieval_folder(tmp_path / "bad", 768, 40, rows=39)
    result = run(main, ["clip", "safety", str(tmp_path / "bad"), "-o", str(tmp_path / "x.parquet"),
                        "--safety-head", str(realmodels / "nsfw/clip_autokeras_binary_nsfw.zip"),
                        "--preset", "laion", "--concepts", "none", "--models-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "39 metadata rows" in result.output, result.output


def test_a_head_of_another_dimension_names_both_models_before_the_bucket_is_read(realmodels, models, tmp_path):
    import dataclasses

    from laion_assets.core import paths
    from laion_assets.core.clip import aesthetic, safety
    from laion_assets.core.storage import Storage

    chosen = dataclasses.replace(models, safety_head=str(realmodels / "nsfw/clip_autokeras_binary_nsfw.zip"),
                                 aesthetic_head=str(realmodels / "aesthetic/v2/sac+logos+ava1-l14-linearMSE.pth"),
                                 concepts="")
    nothing = paths.embedding_files("", 0)  # no files at all: an error about them would mean they were read
    for stage in (safety, aesthetic):
        with pytest.raises(HeadDimensionError) as err:
            stage.run(Storage(str(tmp_path)), nothing, chosen, dim=64)
        assert "ViT-L-14/openai" in str(err.value) and models.embed.name in str(err.value) and "64-d" in str(err.value)


def test_laions_watermark_model_as_published_scores_as_its_recipe(tmp_path):
    """watermark_model_v1.pt is too large for ../shared: a model of exactly its shape with random weights, saved as
    LAION saves it (the whole model's state dict), against a forward pass written from LAION's example_use.py."""
    import random

    import timm
    from torch import nn
    from torchvision import transforms as T

    from laion_assets.core.clip.onepass import Models, one_pass
    from laion_assets.core.clip.specs import LAION_WATERMARK
    from laion_assets.core.clip.watermark import load_watermark_model, watermark_table
    from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render
    from laion_assets_tests.clip.test_clip import write_shard

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256),
                                     nn.ReLU(), nn.Linear(256, 2))
    with torch.no_grad():  # a last layer that leans to one class: index 0 and index 1 then differ clearly
        model.classifier[5].weight.mul_(40)
    torch.save(model.state_dict(), tmp_path / "watermark_model_v1.pt")
    rng = random.Random(1)
    images = [jpeg_bytes(render(random_scene(rng), (rng.randint(200, 400), rng.randint(150, 300)), seed=i,
                                watermark="SAMPLE" if i % 2 else None)) for i in range(6)]
    shard = write_shard(tmp_path / "w.tar", [(f"{i:09d}", img, "a caption", "en") for i, img in enumerate(images)])
    # Whatever the spec says (here: our small classifier's arch and size), the file decides.
    spec = LAION_WATERMARK.__class__("laion", "mobilenetv3_small_050", str(tmp_path / "watermark_model_v1.pt"), 96)
    loaded, used = load_watermark_model(spec)
    assert (used.arch, used.image_size, used.watermark_index, used.interpolation) == (
        "efficientnet_b3a", 256, 0, "bilinear")
    table, _ = watermark_table(one_pass([shard], Models(watermark=loaded, watermark_spec=used),
                                        frozenset(f"{i:09d}" for i in range(6)), batch_size=4))
    from PIL import Image

    preprocessing = T.Compose([T.Resize((256, 256)), T.ToTensor(),
                               T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    batch = torch.stack([preprocessing(Image.open(io.BytesIO(img)).convert("RGB")) for img in images])
    model.eval()
    with torch.no_grad():
        water, _clear = torch.nn.functional.softmax(model(batch), dim=1).numpy().T
    ours = np.array(table["pwatermark"].to_pylist())
    assert np.abs(ours - water).max() < 1e-4, (ours, water)
    assert np.abs(water - 0.5).min() > 0.1  # softmax index 1 (ours) would be far from these


def test_the_index_command_builds_from_clip_retrievals_own_embeddings(tmp_path):
    from laion_assets.core.index.search import open_index

    x = clip_retrieval_folder(tmp_path / "emb", 32, 120, seed=2)
    (tmp_path / "emb" / "text_emb").mkdir()
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_0.npy", x.astype(np.float16))
    keys = [f"{i:09d}" for i in range(120)]  # clip-retrieval's image_path names the rows
    pq.write_table(pa.table({"URL": [f"http://x/{k}.jpg" for k in keys], "caption": keys, "key": keys,
                             "shard": ["00000"] * 120, "WIDTH": [256] * 120, "HEIGHT": [256] * 120,
                             "similarity": [0.3] * 120, "punsafe": [0.1] * 120, "pwatermark": [0.1] * 120,
                             "LANGUAGE": ["en"] * 120}), tmp_path / "meta.parquet")
    result = CliRunner().invoke(main, ["index", str(tmp_path / "emb"), "--metadata", str(tmp_path / "meta.parquet"),
                                       "-o", str(tmp_path / "index"), "--index-key", "Flat", "--eval-queries", "0"])
    assert result.exit_code == 0 and "rows=120" in result.output, result.output
    assert open_index("cli", str(tmp_path / "index")).metadata.num_rows == 120
