"""Safety and watermark tags: `punsafe` from a head on the image embedding, `pwatermark` from an image
classifier; with the training code for both, which also builds the small offline heads.

LAION's safety detector is an MLP on the normalized ViT-L/14 image embedding (768 -> 64 -> 512 -> 256 -> 1,
sigmoid; unsafe above 0.5). LAION's watermark detector is timm's EfficientNet-B3a with a two-class head on
256x256 inputs (watermark above 0.8). Both are loaded from checkpoint paths written by the code here.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from laion_assets.core.clip import decoded_batches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Log = Callable[[str], None]


# --- safety ------------------------------------------------------------------------------------------

class SafetyHead(nn.Module):
    """LAION's safety MLP shape: dim -> 64 -> 512 -> 256 -> 1 (a logit; sigmoid gives punsafe)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _normalized(embeddings: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    return nn.functional.normalize(x, dim=-1)


def train_safety_head(embeddings: np.ndarray, labels: np.ndarray, epochs: int = 40, seed: int = 0,
                      log: Log | None = None) -> SafetyHead:
    """Binary cross-entropy on (embedding, unsafe 0/1) pairs; classes are weighted to balance them."""
    torch.manual_seed(seed)
    x, y = _normalized(embeddings), torch.from_numpy(np.asarray(labels, dtype=np.float32))
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    head = SafetyHead(x.shape[1])
    positive = float(y.mean()) if len(y) else 0.5
    if positive in (0.0, 1.0):
        raise ValueError("the labels need both classes")
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - positive) / positive))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x), 128):
            idx = order[lo:lo + 128]
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log and (epoch % 10 == 0 or epoch == epochs - 1):
            log(f"safety head: epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    return head.eval()


@torch.inference_mode()
def punsafe(head: SafetyHead, embeddings: np.ndarray) -> np.ndarray:
    if len(embeddings) == 0:
        return np.zeros(0, np.float32)
    return torch.sigmoid(head(_normalized(embeddings))).numpy().astype(np.float32)


def save_safety_head(head: SafetyHead, path: str | os.PathLike[str], card: dict[str, Any]) -> None:
    _save(path, {"kind": "safety", "dim": head.dim, "state_dict": head.state_dict()},
          {"kind": "safety", "dim": head.dim, **card})


def load_safety_head(path: str | os.PathLike[str]) -> tuple[SafetyHead, dict[str, Any]]:
    ckpt = _load(path, "safety")
    head = SafetyHead(int(ckpt["dim"]))
    head.load_state_dict(ckpt["state_dict"])
    return head.eval(), _card(path)


# --- watermark -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WatermarkSpec:
    name: str
    arch: str  # a timm model name
    checkpoint: str
    image_size: int = 256
    threshold: float = 0.8


LAION_WATERMARK = WatermarkSpec("efficientnet_b3a/laion-watermark", "efficientnet_b3a", "", 256, 0.8)


def watermark_transform(size: int) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def create_watermark_model(arch: str) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=2)


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
def pwatermark(model: nn.Module, images: torch.Tensor, device: torch.device | None = None) -> np.ndarray:
    device = device or torch.device("cpu")
    images = images.to(device, non_blocking=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with autocast:
        logits = model(images)
    return torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy().astype(np.float32)


def save_watermark(model: nn.Module, spec: WatermarkSpec, card: dict[str, Any]) -> None:
    _save(spec.checkpoint, {"kind": "watermark", "arch": spec.arch, "state_dict": model.state_dict()},
          {"kind": "watermark", "name": spec.name, "arch": spec.arch, "image_size": spec.image_size,
           "threshold": spec.threshold, **card})


def load_watermark(spec: WatermarkSpec, device: torch.device | str = "cpu") -> nn.Module:
    ckpt = _load(spec.checkpoint, "watermark")
    model = create_watermark_model(spec.arch)
    model.load_state_dict(ckpt["state_dict"])
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def watermark_spec_from_checkpoint(path: str | os.PathLike[str]) -> WatermarkSpec:
    card = _card(path)
    return WatermarkSpec(card["name"], card["arch"], str(path), int(card["image_size"]), float(card["threshold"]))


WATERMARK_SCHEMA = pa.schema([("key", pa.string()), ("model", pa.string()), ("pwatermark", pa.float32()),
                              ("watermark", pa.bool_()), ("status", pa.string()), ("error_message", pa.string())])


def watermark_shards(tar_paths: list[str], keep: frozenset[str], model: nn.Module, spec: WatermarkSpec,
                     device: torch.device, batch_size: int = 128, workers: int = 1,
                     log: Log | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """pwatermark of every kept sample, a row each (a sample that fails to decode is a failed row)."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    transform = watermark_transform(spec.image_size)
    for batch in decoded_batches(tar_paths, transform, spec.image_size, batch_size, workers, keep,
                                 pin=device.type == "cuda"):
        idx = [i for i, e in enumerate(batch.errors) if not e]
        scores = np.full(len(batch.keys), np.nan, np.float32)
        if idx:
            scores[idx] = pwatermark(model, batch.images[idx], device)
        for i, key in enumerate(batch.keys):
            ok = not batch.errors[i]
            rows.append({"key": key, "model": spec.name, "pwatermark": float(scores[i]) if ok else None,
                         "watermark": bool(ok and scores[i] > spec.threshold),
                         "status": "scored" if ok else "failed_to_decode", "error_message": batch.errors[i] or None})
        if log:
            log(f"watermark scored {len(rows)} samples")
    rows.sort(key=lambda r: r["key"])
    seconds = time.perf_counter() - start
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


# --- small offline heads -----------------------------------------------------------------------------

# The synthetic world's stand-in for "unsafe": every image whose shape is red. (Colour is what a 32 px CLIP
# sees best; the head only has to find a concept in the embedding, as LAION's does.)
SAFETY_CONCEPT = "red"


def synthetic_watermark_set(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the renders carry a text mark; returned preprocessed as the watermark model sees shards."""
    from laion_assets.core.resize import pad_square
    from laion_assets.core.synthetic import random_scene, render

    rng = random.Random(seed)
    transform = watermark_transform(size)
    images, labels = [], []
    for i in range(n):
        marked = i % 2 == 1
        w, h = rng.randint(128, 200), rng.randint(96, 150)
        mark = rng.choice(["(c) stock", "SAMPLE", "watermark", "shutterpix"]) if marked else None
        img = render(random_scene(rng), (w, h), seed=seed * 1_000_003 + i, watermark=mark)
        buf = io.BytesIO()
        pad_square(img).save(buf, format="JPEG", quality=90)  # as stored in the shards
        images.append(transform(Image.open(buf).convert("RGB")))
        labels.append(int(marked))
    return torch.stack(images), torch.tensor(labels)


# --- checkpoints ---------------------------------------------------------------------------------------

def _save(path: str | os.PathLike[str], payload: dict[str, Any], card: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    Path(str(path) + ".json").write_text(json.dumps(card, indent=2))


def _load(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (it is {ckpt.get('kind')!r})")
    return ckpt


def _card(path: str | os.PathLike[str]) -> dict[str, Any]:
    card = Path(str(path) + ".json")
    return json.loads(card.read_text()) if card.exists() else {}
