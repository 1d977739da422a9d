"""The heads on CLIP embeddings (safety: punsafe; aesthetic: a score about 1..10) in every format they come in,
recognised from the file's content, never from its name:

- ours, written by `train-safety` / `small-models` (`checkpoints.save`: a torch payload with its `kind`, a JSON card
  beside it);
- LAION's PyTorch ports of the NSFW detector (`clip_ViT-L-14_openai_binary_nsfw_head.pth`, the B/32 one): a bare
  state dict `norm.mean`, `norm.variance`, `linear_1..k`;
- LAION's original AutoKeras SavedModels (a zip, or its folder, with `variables/variables.index`; `autokeras.py`);
- LAION-Aesthetics V2 (`sac+logos+ava1-l14-linearMSE.pth`: `layers.0..7`, the MLP with dropouts and no activation)
  and V1 (`sa_0_4_vit_l_14_linear.pth`: one linear layer, `weight`, `bias`).

Every head reads L2-normalised float32 embeddings (what clip-retrieval and LAION's examples feed them).

The PyTorch port and the AutoKeras model differ in one place: the AutoKeras model treats a few columns (the CLIP
embedding's outlier dimensions: 180, 316, 413, 440, 644 of ViT-L/14; 92, 133, 312 of ViT-B/32) as categorical and,
its vocabulary not being saved, maps them to the out-of-vocabulary index 0, while the port's module feeds their
raw values (up to 1.7e-4 apart in punsafe on embeddings near real ones). LAION-5B's punsafe and clip-retrieval's
back end come from the AutoKeras model, so the port is evaluated as the AutoKeras model is: the columns whose
Normalization mean is above 1 (impossible for a coordinate of a unit vector, so only a categorical index has one)
are set to 0 first. Both then agree within 1e-6 (laion_assets_tests/clip/test_laion_models.py, on the real files).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from laion_assets.core.clip.specs import card

KINDS = ("safety", "aesthetic")
# LAION published its heads for these two OpenAI CLIPs only: the embedding model a LAION file reads, by dimension.
LAION_EMBEDDING_MODELS = {768: "ViT-L-14/openai", 512: "ViT-B-32/openai"}
PREDICT_ROWS = 65_536


class HeadError(ValueError):
    """A head file that cannot be read as the kind of head asked for (the message names the file and why)."""


class HeadDimensionError(ValueError):
    """A head whose input dimension is not the embeddings' (the message names both models)."""


@dataclass
class Head:
    """A loaded head: `predict` maps embeddings (N, dim) to one score each."""

    kind: str
    format: str
    dim: int
    name: str
    embedding_model: str  # the CLIP whose embeddings it reads ("" when unknown)
    score: Callable[[np.ndarray], np.ndarray]
    path: str = ""

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or (len(x) and x.shape[1] != self.dim):
            raise HeadDimensionError(f"the {self.kind} head {self.name} takes {self.dim}-d embeddings, not "
                                     f"{x.shape[1:] or x.shape}")
        if not len(x):
            return np.zeros(0, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.concatenate([np.asarray(self.score(x[lo:lo + PREDICT_ROWS]), np.float32)
                               for lo in range(0, len(x), PREDICT_ROWS)])

    def describe(self) -> str:
        model = self.embedding_model or "an unknown model"
        return f"{self.name} ({self.format}, {self.dim}-d, for {model})"


def check_dimension(head: Head, dim: int, embedding_model: str) -> None:
    """HeadDimensionError naming both models when the head cannot read these embeddings."""
    if dim and head.dim != dim:
        raise HeadDimensionError(f"the {head.kind} head {head.describe()} cannot read the embeddings of "
                                 f"{embedding_model or 'an unnamed model'} ({dim}-d): give a head made for "
                                 f"{embedding_model or 'them'} (--{head.kind}-head)")


# --- the modules ----------------------------------------------------------------------------------------------------

class SafetyHead(nn.Module):
    """Our safety MLP (LAION's shape): dim -> 64 -> 512 -> 256 -> 1, a logit (sigmoid gives punsafe)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class LaionNsfwHead(nn.Module):
    """LAION's PyTorch port of its NSFW detector (their `NSFWModel_L14` / `_B32`: Normalization, linears with ReLU
    between, sigmoid), its categorical columns set to the AutoKeras model's out-of-vocabulary 0 (module docstring)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("mean", state["norm.mean"].float())
        self.register_buffer("variance", state["norm.variance"].float())
        self.register_buffer("categorical", self.mean.abs() > 1.0)
        count = sum(1 for k in state if k.startswith("linear_") and k.endswith(".weight"))
        self.linears = nn.ModuleList()
        for i in range(1, count + 1):
            w, b = state[f"linear_{i}.weight"], state[f"linear_{i}.bias"]
            layer = nn.Linear(w.shape[1], w.shape[0])
            layer.load_state_dict({"weight": w, "bias": b})
            self.linears.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(self.categorical, 0.0)
        x = (x - self.mean) / (self.variance.sqrt() + 1e-10)  # the port's Normalization
        for i, layer in enumerate(self.linears):
            x = layer(x)
            if i < len(self.linears) - 1:
                x = torch.relu(x)
        return torch.sigmoid(x).squeeze(-1)


class AestheticMLP(nn.Module):
    """LAION-Aesthetics V2's predictor shape: dim -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no activation
    (its `layers.0..7`); ours is the same module on the small CLIP's embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class AestheticLinear(nn.Module):
    """LAION-Aesthetics V1: one linear layer on the embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def _torch_scorer(module: nn.Module, then: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> Callable[[np.ndarray], np.ndarray]:
    module = module.eval()

    @torch.inference_mode()
    def score(x: np.ndarray) -> np.ndarray:
        out = module(torch.from_numpy(x))
        return (then(out) if then else out).numpy()

    return score


# --- recognising a file --------------------------------------------------------------------------------------------

def _unreadable(path: str, kind: str, err: BaseException) -> HeadError:
    return HeadError(f"{path}: not a readable {kind} head (corrupt or truncated?): {type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}")


def _is_saved_model(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "variables", "variables.index"))
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False
    from laion_assets.core.clip.autokeras import is_saved_model_zip

    try:
        with zipfile.ZipFile(path) as archive:
            return is_saved_model_zip(archive.namelist())
    except zipfile.BadZipFile:
        return False  # torch.load says what is wrong with it


def load_head(path: str | os.PathLike[str], kind: str) -> Head:
    """The head at `path`, of whichever format its content says (module docstring); FileNotFoundError when it
    is missing, HeadError when it is not a `kind` head or cannot be read."""
    path = str(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} head not found: {path}")
    if _is_saved_model(path):
        return _autokeras(path, kind)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, not a torch file: all "unreadable"
        raise _unreadable(path, kind, err) from err
    if not isinstance(payload, dict):
        raise HeadError(f"{path}: a torch file holding a {type(payload).__name__}, not a {kind} head")
    try:
        return _from_payload(path, kind, payload)
    except (KeyError, RuntimeError, ValueError) as err:
        if isinstance(err, HeadError):
            raise
        raise HeadError(f"{path}: not a {kind} head of a known format ({type(err).__name__}: {err})") from err


def _from_payload(path: str, kind: str, payload: dict[str, Any]) -> Head:
    doc = card(path)
    if "kind" in payload:  # ours
        if payload["kind"] != kind:
            raise HeadError(f"{path} is not a {kind} head (it is a {payload['kind']!r} checkpoint)")
        dim = int(payload["dim"])
        module: nn.Module = SafetyHead(dim) if kind == "safety" else AestheticMLP(dim)
        module.load_state_dict(payload["state_dict"])
        return Head(kind, "laion-assets", dim, doc.get("name", os.path.basename(path)),
                    doc.get("embedding_model", ""),
                    _torch_scorer(module, torch.sigmoid if kind == "safety" else None), path)
    keys = set(payload)
    if {"norm.mean", "norm.variance", "linear_1.weight"} <= keys:
        _expect(path, kind, "safety", "LAION's NSFW detector (PyTorch port)")
        head = LaionNsfwHead(payload)
        return _laion(path, kind, "laion-nsfw-pytorch", int(head.mean.shape[0]), _torch_scorer(head), doc)
    if {"layers.0.weight", "layers.7.weight"} <= keys:
        _expect(path, kind, "aesthetic", "LAION-Aesthetics V2")
        dim = int(payload["layers.0.weight"].shape[1])
        mlp = AestheticMLP(dim)
        mlp.load_state_dict({k: v.float() for k, v in payload.items()})
        return _laion(path, kind, "laion-aesthetic-v2", dim, _torch_scorer(mlp), doc)
    if keys == {"weight", "bias"} and payload["weight"].shape[0] == 1:
        _expect(path, kind, "aesthetic", "LAION-Aesthetics V1")
        dim = int(payload["weight"].shape[1])
        linear = AestheticLinear(dim)
        linear.linear.load_state_dict({k: v.float() for k, v in payload.items()})
        return _laion(path, kind, "laion-aesthetic-v1", dim, _torch_scorer(linear), doc)
    raise HeadError(f"{path}: a state dict of no known {kind} head (keys {sorted(keys)[:6]})")


def _expect(path: str, kind: str, wanted: str, what: str) -> None:
    if kind != wanted:
        raise HeadError(f"{path} is {what}, a {wanted} head, not a {kind} head")


def _laion(path: str, kind: str, fmt: str, dim: int, score: Callable[[np.ndarray], np.ndarray],
           doc: dict[str, Any]) -> Head:
    model = doc.get("embedding_model") or LAION_EMBEDDING_MODELS.get(dim, "")
    return Head(kind, fmt, dim, doc.get("name") or f"{fmt}:{model or f'{dim}-d'}", model, score, path)


def _autokeras(path: str, kind: str) -> Head:
    from laion_assets.core.clip.autokeras import load_autokeras
    from laion_assets.core.clip.tfbundle import BundleError

    _expect(path, kind, "safety", "LAION's NSFW detector (AutoKeras SavedModel)")
    try:
        model = load_autokeras(path)
    except BundleError as err:
        raise HeadError(str(err)) from err
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as err:
        raise _unreadable(path, kind, err) from err
    return _laion(path, kind, "laion-nsfw-autokeras", model.dim, model.predict, card(path))
