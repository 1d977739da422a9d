"""`pwatermark`: LAION's watermark detector, timm's EfficientNet-B3a on 256x256 inputs (watermark above 0.8), and
the per-bucket scores. Two checkpoint formats, recognised from the file's content:

- LAION's `watermark_model_v1.pt` as published: the whole model's state dict, its `classifier` replaced by Linear
  1536->625, ReLU, Dropout 0.3, Linear 625->256, ReLU, Linear 256->2; images resized to 256 x 256 (bilinear, as
  its example's `T.Resize`), ImageNet-normalised; pwatermark is softmax index 0;
- ours (`laion-assets train-watermark`): a timm model with a two-class head, its card naming the arch and size;
  pwatermark is softmax index 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from laion_assets.core.clip import checkpoints
from laion_assets.core.clip.specs import LAION_WATERMARK, WatermarkSpec
from laion_assets.core.progress import Log

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def watermark_transform(size: int, interpolation: str = "bicubic") -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode(interpolation)), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def create_watermark_model(arch: str) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=2)


def laion_classifier() -> nn.Module:
    """The head LAION put on efficientnet_b3a's 1536 features (its example_use.py and inference.py)."""
    return nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256), nn.ReLU(),
                         nn.Linear(256, 2))


def create_laion_watermark_model() -> nn.Module:
    model = create_watermark_model(LAION_WATERMARK.arch)
    model.classifier = laion_classifier()
    return model


def is_laion_state_dict(payload: Any) -> bool:
    """LAION's file: a bare state dict of efficientnet_b3a with its three-layer classifier."""
    return (isinstance(payload, dict) and "kind" not in payload and "conv_stem.weight" in payload
            and tuple(getattr(payload.get("classifier.0.weight"), "shape", ())) == (625, 1536))


def train_watermark(images: torch.Tensor, labels: torch.Tensor, arch: str, epochs: int = 6, batch_size: int = 64,
                    seed: int = 0, log: Log | None = None) -> nn.Module:
    """Cross-entropy on preprocessed images (N, 3, S, S) with labels 1 = watermarked."""
    torch.manual_seed(seed)
    model = create_watermark_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for lo in range(0, len(images) - batch_size + 1, batch_size):
            idx = order[lo:lo + batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step < steps - 1:
                sched.step()
            step += 1
        if log:
            log(f"watermark: epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.inference_mode()
def pwatermark(model: nn.Module, images: torch.Tensor, device: torch.device | None = None, index: int = 1
               ) -> np.ndarray:
    """The softmax output `index` (the spec's watermark_index: 1 ours, 0 LAION's) of preprocessed images."""
    device = device or torch.device("cpu")
    # The input in the weights' dtype (float16 weights on CUDA, see load_watermark): no autocast around float32.
    images = images.to(device, dtype=next(model.parameters()).dtype, non_blocking=True)
    logits = model(images)
    return torch.softmax(logits.float(), dim=-1)[:, index].cpu().numpy().astype(np.float32)


def save_watermark(model: nn.Module, spec: WatermarkSpec, card: dict[str, Any]) -> None:
    checkpoints.save(spec.checkpoint, {"kind": "watermark", "arch": spec.arch, "state_dict": model.state_dict()},
          {"kind": "watermark", "name": spec.name, "arch": spec.arch, "image_size": spec.image_size,
           "threshold": spec.threshold, **card})


class WatermarkCheckpointError(ValueError):
    """A watermark checkpoint that is neither LAION's nor ours, or cannot be read."""


def load_watermark(spec: WatermarkSpec, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                   ) -> nn.Module:
    """The classifier of `spec` (see `load_watermark_model`), alone."""
    return load_watermark_model(spec, device, dtype)[0]


def load_watermark_model(spec: WatermarkSpec, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                         ) -> tuple[nn.Module, WatermarkSpec]:
    """The classifier on `device` and the spec it runs with: LAION's file gets LAION's shape, input and output
    index whatever the spec said (the file decides), ours its own. Weights in `dtype` (default: float16 on CUDA, as
    the CLIP towers run there, instead of bfloat16 autocast around float32 weights; float32 on the CPU). float16,
    not bfloat16: with every layer in bfloat16 (its batch norms too, which autocast kept in float32) pwatermark
    moved by up to 0.17 on the test's images, float16 by under 0.05."""
    import dataclasses
    import os

    if not os.path.exists(spec.checkpoint):
        raise FileNotFoundError(f"watermark checkpoint not found: {spec.checkpoint}")
    try:
        payload = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file: unreadable either way
        raise WatermarkCheckpointError(f"{spec.checkpoint}: not a readable watermark checkpoint (corrupt or "
                                       f"truncated?): {type(err).__name__}: {err}") from err
    if is_laion_state_dict(payload):
        model = create_laion_watermark_model()
        model.load_state_dict(payload)
        spec = dataclasses.replace(spec, arch=LAION_WATERMARK.arch, image_size=LAION_WATERMARK.image_size,
                                   watermark_index=0, interpolation=LAION_WATERMARK.interpolation)
    elif isinstance(payload, dict) and payload.get("kind") == "watermark":
        model = create_watermark_model(payload.get("arch", spec.arch))
        model.load_state_dict(payload["state_dict"])
        spec = dataclasses.replace(spec, arch=payload.get("arch", spec.arch), watermark_index=1)
    else:
        raise WatermarkCheckpointError(f"{spec.checkpoint}: neither LAION's watermark model (efficientnet_b3a with "
                                       "its 1536-625-256-2 classifier) nor one train-watermark wrote")
    cuda = torch.device(device).type == "cuda"
    model = model.to(device, dtype=dtype or (torch.float16 if cuda else torch.float32)).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    return model, spec


WATERMARK_SCHEMA = pa.schema([("key", pa.string()), ("model", pa.string()), ("pwatermark", pa.float32()),
                              ("watermark", pa.bool_()), ("status", pa.string()), ("error_message", pa.string())])


def watermark_table(result: Any) -> tuple[pa.Table, dict[str, Any]]:
    """A pass's watermark rows sorted by key, and their report."""
    rows = sorted(result.watermark_rows, key=lambda r: r["key"])
    seconds = result.seconds
    marked = sum(r["watermark"] for r in rows)
    return pa.Table.from_pylist(rows, schema=WATERMARK_SCHEMA), {
        "samples": len(rows), "watermarked": marked, "failed_to_decode": sum(r["status"] != "scored" for r in rows),
        "seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 1) if seconds else 0.0}


def load_image_folders(root: str | os.PathLike[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images under root/clean/ (label 0) and root/watermark/ (label 1), preprocessed for training."""
    transform = watermark_transform(size)
    tensors, labels = [], []
    for label, folder in enumerate(("clean", "watermark")):
        path = Path(root, folder)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing: train-watermark wants {root}/clean and {root}/watermark")
        for file in sorted(path.iterdir()):
            try:
                with Image.open(file) as img:
                    tensors.append(transform(img.convert("RGB")))
                    labels.append(label)
            except OSError:
                continue  # not an image: skipped, as a folder of images may hold other files
    if len(set(labels)) < 2:
        raise ValueError("train-watermark needs images in both clean/ and watermark/")
    return torch.stack(tensors), torch.tensor(labels)
