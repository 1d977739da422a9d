"""`punsafe`: LAION's safety detector (an MLP on the image embedding; unsafe above 0.5) in any of its formats
(`heads.py`: LAION's PyTorch ports, its original AutoKeras SavedModels, or a head trained here with `laion-assets
train-safety`), the concept filter's similarities beside it (`concepts.py`), and the per-bucket scores (`run`, what
the `safety_scores` asset and `laion-assets clip safety` call).
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
from laion_assets.core.clip.heads import Head, HeadDimensionError, SafetyHead, check_dimension, load_head
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.specs import card
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.storage import Storage

SAFETY_SCHEMA = pa.schema([("key", pa.string()), ("model", pa.string()), ("punsafe", pa.float32()),
                           ("unsafe", pa.bool_())])
# The concept filter's columns, appended when a concept file is set (concepts.py).
CONCEPT_SCHEMA = pa.schema([("nsfw_concept", pa.string()), ("nsfw_similarity", pa.float32()),
                            ("special_concept", pa.string()), ("special_similarity", pa.float32()),
                            ("concept_filtered", pa.bool_())])


def safety_schema(concepts: bool) -> pa.Schema:
    """The safety scores' columns: with the concept filter's when a concept file is set."""
    return pa.schema(list(SAFETY_SCHEMA) + (list(CONCEPT_SCHEMA) if concepts else []))


SafetyDimensionError = HeadDimensionError  # the name the CLI and the asset catch
__all__ = ["SafetyHead", "SafetyDimensionError", "NoSafetyHead", "run", "punsafe", "train_safety_head"]


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
    """A head trained here, as its module (for training and tests); `heads.load_head` reads every format."""
    ckpt = checkpoints.load(path, "safety")
    head = SafetyHead(int(ckpt["dim"]))
    head.load_state_dict(ckpt["state_dict"])
    return head.eval(), card(path)


def safety_table(keys: pa.Array, embeddings: np.ndarray, head: Head, threshold: float, concepts: Any = None
                 ) -> pa.Table:
    """punsafe of every embedded sample, row-aligned with its keys; the concept filter's columns when `concepts`
    (an `EncodedConcepts`) is given."""
    scores = head.predict(embeddings)
    table = pa.table({"key": keys, "model": pa.array([head.name] * len(scores), pa.string()),
                      "punsafe": pa.array(scores, pa.float32()), "unsafe": pa.array(scores > threshold)},
                     schema=SAFETY_SCHEMA)
    if concepts is None:
        return table
    from laion_assets.core.clip.concepts import concept_columns

    for name, values in concept_columns(embeddings, concepts).items():
        field = CONCEPT_SCHEMA.field(name)
        table = table.append_column(field, pa.array(values, field.type))
    return table


class NoSafetyHead(ValueError):
    """The model set names no safety head."""


def encoded_concepts(chosen: ModelSet, log: Log | None = None) -> Any:
    """The model set's concept file encoded by the embedding CLIP's text tower (None when none is set)."""
    if not chosen.concepts:
        return None
    from laion_assets.core.clip.concepts import encode_concepts, load_concepts
    from laion_assets.core.clip.models import load_clip

    concepts = load_concepts(chosen.concepts)
    if log:
        log(f"encoding {len(concepts.names())} concepts with the text tower of {chosen.embed.name}")
    return encode_concepts(concepts, load_clip(chosen.embed, "cpu"))


def run(store: Storage, files: EmbeddingKeys, chosen: ModelSet, dim: int = 0, log: Log | None = None
        ) -> tuple[pa.Table, dict[str, Any]]:
    """The safety scores' entry point: punsafe of every sample of one bucket's embeddings from the model set's
    head, with the concept filter's columns when a concept file is set, and a report (samples, unsafe, model,
    unsafe fraction, concept-filtered). `dim`, when known (the embeddings' manifest), is checked against the head
    before the bucket is read; otherwise once its image array is."""
    if not chosen.safety_head:
        raise NoSafetyHead("no safety head configured (ModelSettings.safety_head, --safety-head)")
    head = load_head(chosen.safety_head, "safety")
    check_dimension(head, dim, chosen.embed.name)
    img, meta = read_image_embeddings(store, files)
    check_dimension(head, img.shape[1], embedding_model(meta) or chosen.embed.name)
    table = safety_table(sample_keys(meta), img, head, chosen.safety_threshold, encoded_concepts(chosen, log))
    unsafe = sum(table["unsafe"].to_pylist())
    report = {"samples": table.num_rows, "unsafe": unsafe, "model": head.name, "format": head.format,
              "unsafe_fraction": round(unsafe / table.num_rows, 4) if table.num_rows else 0.0}
    if "concept_filtered" in table.column_names:
        report["concept_filtered"] = sum(table["concept_filtered"].to_pylist())
    return table, report
