"""The records the CLIP stage returns for its bulk files (no torch import: the code location loads them)."""

from __future__ import annotations

from dataclasses import dataclass

from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.records import JsonRecord


@dataclass
class EmbeddingsManifest(JsonRecord):
    """One bucket's embeddings: where its three files are, how many rows, the dimension, the arrays' sha256."""

    files: EmbeddingKeys
    rows: int
    dim: int
    img_sha256: str
    text_sha256: str
