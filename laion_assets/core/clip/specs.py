"""What identifies a model, without loading it (no torch import): CLIP and watermark specs, checkpoint cards, and
the identity of weights that decides whether stored scores still hold."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from laion_assets.core.storage import file_sha256 as storage_sha256


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP model: what to load and the similarity threshold that goes with it."""

    name: str  # recorded with every score
    arch: str
    pretrained: str  # an open_clip pretrained tag or a checkpoint path
    threshold: float = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> ClipSpec:
        """A checkpoint written by `save_clip`, with the threshold calibrated when it was trained."""
        doc = card(path)
        return cls(doc["name"], doc["arch"], str(path), float(doc["threshold"]))


@dataclass(frozen=True)
class WatermarkSpec:
    name: str
    arch: str  # a timm model name
    checkpoint: str
    image_size: int = 256
    threshold: float = 0.8
    watermark_index: int = 1  # which softmax output is pwatermark: 1 in ours, 0 in LAION's
    interpolation: str = "bicubic"  # the resize to image_size: LAION's example uses torchvision's default, bilinear


# LAION's detector (LAION-AI/LAION-5B-WatermarkDetection): efficientnet_b3a with its own classifier head, 256 x 256
# bilinear, ImageNet mean and std, softmax index 0.
LAION_WATERMARK = WatermarkSpec("efficientnet_b3a/laion-watermark", "efficientnet_b3a", "", 256, 0.8,
                                watermark_index=0, interpolation="bilinear")


def card(path: str | os.PathLike[str]) -> dict:
    """The JSON card written beside a checkpoint ({} when there is none)."""
    file = Path(str(path) + ".json")
    return json.loads(file.read_text()) if file.exists() else {}


def watermark_spec_from_checkpoint(path: str | os.PathLike[str]) -> WatermarkSpec:
    doc = card(path)
    return WatermarkSpec(doc["name"], doc["arch"], str(path), int(doc["image_size"]), float(doc["threshold"]))


def file_sha256(path: str) -> str:
    """sha256 of a file; remembered per (path, size, mtime), as a checkpoint of a GB is read once a run."""
    st = os.stat(path)
    return _sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    return storage_sha256(path)


def weights_id(arch: str, pretrained: str) -> str:
    """What identifies a model's weights: the checkpoint file's sha256, or open_clip's (arch, tag) pair, whose
    files open_clip pins; "" for random weights, which are never the same twice."""
    if not pretrained:
        return ""
    if os.path.isfile(pretrained):
        return f"sha256:{file_sha256(pretrained)}"
    return f"open_clip:{arch}:{pretrained}"
