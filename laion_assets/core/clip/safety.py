"""`punsafe`: LAION's safety detector shape, an MLP on the normalized image embedding (768 -> 64 -> 512 -> 256 -> 1,
sigmoid; unsafe above 0.5), with its training code (`laion-assets train-safety`) and the per-bucket scores (`run`,
what the `safety_scores` asset and `laion-assets clip safety` call).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from laion_assets.core.clip import checkpoints
from laion_assets.core.clip.embeddings import read_embeddings
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.specs import card
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.storage import Storage

SAFETY_SCHEMA = pa.schema([("key", pa.string()), ("model", pa.string()), ("punsafe", pa.float32()),
                           ("unsafe", pa.bool_())])


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
    checkpoints.save(path, {"kind": "safety", "dim": head.dim, "state_dict": head.state_dict()},
          {"kind": "safety", "dim": head.dim, **card})


def load_safety_head(path: str | os.PathLike[str]) -> tuple[SafetyHead, dict[str, Any]]:
    ckpt = checkpoints.load(path, "safety")
    head = SafetyHead(int(ckpt["dim"]))
    head.load_state_dict(ckpt["state_dict"])
    return head.eval(), card(path)


class SafetyDimensionError(ValueError):
    pass


def safety_table(keys: pa.Array, embeddings: np.ndarray, head: SafetyHead, name: str, threshold: float) -> pa.Table:
    """punsafe of every embedded sample, row-aligned with its keys."""
    if embeddings.shape[0] and head.dim != embeddings.shape[1]:
        raise SafetyDimensionError(f"the safety head takes {head.dim}-d embeddings but these are "
                                   f"{embeddings.shape[1]}-d")
    scores = punsafe(head, embeddings)
    return pa.table({"key": keys, "model": pa.array([name] * len(scores), pa.string()),
                     "punsafe": pa.array(scores, pa.float32()), "unsafe": pa.array(scores > threshold)},
                    schema=SAFETY_SCHEMA)


class NoSafetyHead(ValueError):
    """The model set names no safety head."""


def run(store: Storage, files: EmbeddingKeys, chosen: ModelSet) -> tuple[pa.Table, dict[str, Any]]:
    """The safety scores' entry point: punsafe of every sample of one bucket's embeddings from the model set's
    head, and a report (samples, unsafe, model, unsafe fraction)."""
    if not chosen.safety_head:
        raise NoSafetyHead("no safety head configured (ModelSettings.safety_head, --safety-head)")
    img, _, meta = read_embeddings(store, files)
    head, doc = load_safety_head(chosen.safety_head)
    name = doc.get("name", chosen.safety_head)
    try:
        table = safety_table(meta["key"], img, head, name, chosen.safety_threshold)
    except SafetyDimensionError as err:
        raise SafetyDimensionError(f"{err} (the embeddings of {chosen.embed.name}, the head {name})") from err
    unsafe = sum(table["unsafe"].to_pylist())
    return table, {"samples": table.num_rows, "unsafe": unsafe, "model": name,
                   "unsafe_fraction": round(unsafe / table.num_rows, 4) if table.num_rows else 0.0}
