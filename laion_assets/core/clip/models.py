"""Loading CLIP models: open_clip architectures with a pretrained tag or a checkpoint path, and the identity of
their weights (what decides whether stored scores can be reused).

Nothing downloads unless a pretrained tag that needs it is configured: the offline default is a small CLIP the
project trains on its synthetic world (`offline/small_models.py`), registered with open_clip as
`laion-assets-small`. On CUDA the model runs channels-last under bf16 autocast with pinned, non-blocking copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laion_assets.core.clip.specs import ClipSpec, file_sha256, weights_id  # noqa: F401 - re-exported

SMALL_ARCH = "laion-assets-small"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "models"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Log = Callable[[str], None]


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@dataclass
class LoadedClip:
    spec: ClipSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """L2-normalized image embeddings of preprocessed images (N, 3, S, S), anywhere."""
        return self.encode_pixels(images)

    @torch.inference_mode()
    def encode_pixels(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = self.model.encode_image(images)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenizer(texts))

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """L2-normalized text embeddings of tokenized captions (what `tokenizer` returns)."""
        tokens = tokens.to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def register_small_arch() -> None:
    import open_clip

    if SMALL_ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{SMALL_ARCH}.json")


def load_clip(spec: ClipSpec, device: torch.device | str = "cpu") -> LoadedClip:
    """The model, its preprocessing and tokenizer; weights from the tag or checkpoint (nothing else)."""
    import open_clip

    register_small_arch()
    device = torch.device(device)
    if spec.pretrained and os.sep in spec.pretrained and not os.path.exists(spec.pretrained):
        raise FileNotFoundError(f"checkpoint of model {spec.name!r} not found: {spec.pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.arch, pretrained=spec.pretrained or None, device=device)
    model.eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return LoadedClip(spec, model, preprocess, open_clip.get_tokenizer(spec.arch), device)
