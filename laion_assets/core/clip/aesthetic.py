"""Aesthetic scores: the LAION-Aesthetics V2 predictor (an MLP on the L2-normalised ViT-L/14 image embedding, a
score of about 1..10; LAION-Aesthetics is LAION-5B at >= 4.5, 5, 6 and 6.5) or any head `heads.py` reads (V1's
linear one, or one trained here), and the per-bucket scores (`run`, what the `aesthetic_scores` asset and
`laion-assets clip aesthetic` call).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from laion_assets.core.clip import checkpoints
from laion_assets.core.clip.embeddings import embedding_model, read_image_embeddings, sample_keys
from laion_assets.core.clip.heads import AestheticMLP, check_dimension, load_head
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.storage import Storage

AESTHETIC_SCHEMA = pa.schema([("key", pa.string()), ("model", pa.string()), ("aesthetic", pa.float32())])
# The LAION-Aesthetics subsets: LAION-5B's samples at these scores and above.
SUBSET_THRESHOLDS = (4.5, 5.0, 6.0, 6.5)


class NoAestheticHead(ValueError):
    """The model set names no aesthetic head."""


def train_aesthetic_head(embeddings: np.ndarray, scores: np.ndarray, epochs: int = 60, seed: int = 0,
                         lr: float = 1e-3, log: Log | None = None) -> AestheticMLP:
    """Mean squared error of V2's MLP on (L2-normalised embedding, score) pairs, as LAION trained V2."""
    torch.manual_seed(seed)
    x = nn.functional.normalize(torch.from_numpy(np.asarray(embeddings, np.float32)), dim=-1)
    y = torch.from_numpy(np.asarray(scores, np.float32))
    if len(x) != len(y) or not len(x):
        raise ValueError(f"{len(x)} embeddings but {len(y)} scores")
    head = AestheticMLP(x.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x), 128):
            idx = order[lo:lo + 128]
            loss = nn.functional.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log and (epoch % 20 == 0 or epoch == epochs - 1):
            log(f"aesthetic head: epoch {epoch + 1}/{epochs} mse {loss.item():.3f}")
    return head.eval()


def save_aesthetic_head(head: AestheticMLP, path: str | os.PathLike[str], card: dict[str, Any]) -> None:
    checkpoints.save(path, {"kind": "aesthetic", "dim": head.dim, "state_dict": head.state_dict()},
                     {"kind": "aesthetic", "dim": head.dim, **card})


def aesthetic_table(keys: pa.Array, scores: np.ndarray, name: str) -> pa.Table:
    return pa.table({"key": keys, "model": pa.array([name] * len(scores), pa.string()),
                     "aesthetic": pa.array(scores, pa.float32())}, schema=AESTHETIC_SCHEMA)


def run(store: Storage, files: EmbeddingKeys, chosen: ModelSet, dim: int = 0) -> tuple[pa.Table, dict[str, Any]]:
    """The aesthetic scores' entry point: the score of every sample of one bucket's embeddings, and a report
    (samples, mean, the counts at the LAION-Aesthetics thresholds). `dim` as in `safety.run`."""
    if not chosen.aesthetic_head:
        raise NoAestheticHead("no aesthetic head configured (ModelSettings.aesthetic_head, --aesthetic-head)")
    head = load_head(chosen.aesthetic_head, "aesthetic")
    check_dimension(head, dim, chosen.embed.name)
    img, meta = read_image_embeddings(store, files)
    check_dimension(head, img.shape[1], embedding_model(meta) or chosen.embed.name)
    scores = head.predict(img)
    table = aesthetic_table(sample_keys(meta), scores, head.name)
    report: dict[str, Any] = {"samples": table.num_rows, "model": head.name, "format": head.format,
                              "mean": round(float(scores.mean()), 4) if len(scores) else 0.0}
    report.update({f"at_least_{t:g}": int((scores >= t).sum()) for t in SUBSET_THRESHOLDS})
    return table, report
