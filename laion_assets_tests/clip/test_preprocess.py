"""The device path (torchvision decode, tensor resize and normalize; here on the CPU device) against the PIL path:
the same similarities within 0.01, the same keep decisions, and a corrupt image one failed row on both."""

from __future__ import annotations

import numpy as np
import torch

from laion_assets.core.clip import scores
from laion_assets.core.clip.models import load_clip
from laion_assets.core.clip.onepass import Models, one_pass
from laion_assets.core.clip.preprocess import decode
from laion_assets_tests.clip.test_clip import held_out, write_shard


def test_device_path_agrees_with_the_pil_path(models, tmp_path):
    pairs = held_out(200, seed=31)
    pairs[7] = (pairs[7][0], pairs[7][1][: len(pairs[7][1]) // 2], pairs[7][2], pairs[7][3])  # truncated JPEG
    pairs[120] = (pairs[120][0], b"\x89PNG not really", pairs[120][2], pairs[120][3])
    shard = write_shard(tmp_path / "a.tar", pairs)
    english, multi = load_clip(models.clip_en), load_clip(models.clip_multi)
    pil = scores.score_table(one_pass([shard], Models(english, multi), batch_size=64, workers=1, path="pil"))
    device_pass = one_pass([shard], Models(english, multi), batch_size=64, workers=1, path="device")
    dev, report = scores.score_table(device_pass), device_pass.score_report
    for table in (pil, dev):
        failed = [r["key"] for r in table.to_pylist() if r["status"] == "failed_to_decode"]
        assert failed == [pairs[7][0], pairs[120][0]]
    assert report.failed == 2 and report.samples == 200
    ok = np.array([s == "scored" for s in pil["status"].to_pylist()])
    a = np.array(pil["similarity"].to_pylist(), dtype=object)[ok].astype(np.float32)
    b = np.array(dev["similarity"].to_pylist(), dtype=object)[ok].astype(np.float32)
    assert np.abs(a - b).max() < 0.01, np.abs(a - b).max()
    agree = np.mean(np.array(pil["keep"].to_pylist()) == np.array(dev["keep"].to_pylist()))
    assert agree >= 0.995, agree


def test_decode_falls_back_and_reports_one_error_per_bad_image(models):
    good = held_out(2, seed=3)[0][1]
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in (good, good[:300], b"junk", good)]
    images, errors = decode(datas, torch.device("cpu"))
    assert [e != "" for e in errors] == [False, True, True, False]
    assert images[0] is not None and images[0].dtype == torch.uint8 and images[0].shape[0] == 3
    assert images[1] is None and "cannot decode image" in errors[1]


def test_sdpa_attention_equals_multihead_attention_and_fp8_needs_cuda():
    import open_clip
    import pytest

    from laion_assets.core.clip.models import PrecisionError, inference_model, use_sdpa

    torch.manual_seed(0)
    model = open_clip.create_model("laion-assets-small").eval()
    images = torch.randn(4, 3, 32, 32)
    tokens = open_clip.get_tokenizer("laion-assets-small")(["a red square", "a dog", "x", "two blue circles"])
    with torch.inference_mode():
        before = model.encode_image(images), model.encode_text(tokens)
        assert use_sdpa(model) == 4  # two image and two text blocks
        after = model.encode_image(images), model.encode_text(tokens)
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    with pytest.raises(PrecisionError, match="needs a CUDA device"):
        inference_model(model, torch.device("cpu"), "fp8")
    with pytest.raises(PrecisionError, match="one of"):
        inference_model(model, torch.device("cpu"), "int3")
