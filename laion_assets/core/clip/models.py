"""Loading CLIP models: open_clip architectures with a pretrained tag or a checkpoint path, and the identity of
their weights (what decides whether stored scores can be reused).

Nothing downloads unless a pretrained tag that needs it is configured: the offline default is a small CLIP the
project trains on its synthetic world (`offline/small_models.py`), registered with open_clip as
`laion-assets-small`. On CUDA the weights are fp16 (or bf16, or float8 matmuls for the embedding CLIP), the
model runs channels-last, and attention goes through scaled-dot-product attention. On the CPU nothing changes.
"""

from __future__ import annotations

import os
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: the weights' (fp16/bf16 on CUDA, float32 on the CPU)."""
        return next(self.model.parameters()).dtype if self.device.type == "cuda" else torch.float32

    def _autocast(self) -> Any:
        # The weights are in their inference dtype already (load_clip): no autocast around float32 weights.
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def encode_pixels(self, images: torch.Tensor) -> np.ndarray:
        """L2-normalized image embeddings of preprocessed images (N, 3, S, S), anywhere."""
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.to(self.dtype).contiguous(memory_format=torch.channels_last)
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


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}


class PrecisionError(ValueError):
    """A precision this model or machine cannot run (fp8 without torchao or without CUDA, an unknown name)."""


class SdpaAttention(torch.nn.Module):
    """nn.MultiheadAttention's self-attention through F.scaled_dot_product_attention (flash or memory-efficient
    kernels on CUDA) with the same weights; other calls (cross-attention, attention weights) go to the module."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        mha = self.mha
        if (need_weights or key_padding_mask is not None or kwargs or not (query is key is value)
                or mha.in_proj_weight is None or (attn_mask is not None and attn_mask.dim() != 2)):
            return mha(query, key, value, need_weights=need_weights, attn_mask=attn_mask,
                       key_padding_mask=key_padding_mask, **kwargs)
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(
            b, n, 3, mha.num_heads, e // mha.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:  # MultiheadAttention masks where True; SDPA keeps where True
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = mha.out_proj(out.transpose(1, 2).reshape(b, n, e))
        return (out if mha.batch_first else out.transpose(0, 1)), None


def use_sdpa(model: torch.nn.Module) -> int:
    """Every nn.MultiheadAttention of the model behind SdpaAttention; how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention):
                setattr(module, name, SdpaAttention(child))
                swapped += 1
    return swapped


def to_fp8(model: torch.nn.Module) -> None:
    """The image tower's linear layers as float8 matmuls (torchao's dynamic activation and weight scaling)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError as err:
        raise PrecisionError("embed_precision fp8 needs torchao (pip install torchao) and an FP8 GPU (H100); "
                             "use fp16") from err
    quantize_(model.visual, Float8DynamicActivationFloat8WeightConfig())


def inference_model(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """On CUDA: weights cast to fp16/bf16 (fp8: fp16 and float8 matmuls in the image tower), channels-last,
    attention through SDPA. On the CPU: float32, unchanged."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    if device.type != "cuda":  # float32 as before: the CPU path's results stay what they were
        if precision == "fp8":
            raise PrecisionError("embed_precision fp8 needs a CUDA device (H100); the CPU runs float32")
        return model
    use_sdpa(model)
    model = model.to(PRECISIONS[precision]).to(memory_format=torch.channels_last)
    if precision == "fp8":
        to_fp8(model)
    return model


def load_clip(spec: ClipSpec, device: torch.device | str = "cpu", precision: str = "fp16") -> LoadedClip:
    """The model, its preprocessing and tokenizer; weights from the tag or checkpoint (nothing else).
    `precision` is the weights' dtype on CUDA (see `inference_model`)."""
    import open_clip

    register_small_arch()
    device = torch.device(device)
    if spec.pretrained and os.sep in spec.pretrained and not os.path.exists(spec.pretrained):
        raise FileNotFoundError(f"checkpoint of model {spec.name!r} not found: {spec.pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.arch, pretrained=spec.pretrained or None, device=device)
    model = inference_model(model.eval(), device, precision)
    return LoadedClip(spec, model, preprocess, open_clip.get_tokenizer(spec.arch), device)
