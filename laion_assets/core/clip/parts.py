"""What the CLIP pass can compute (no torch import: the code location maps its assets onto these when it loads)."""

from __future__ import annotations

import enum


class Part(enum.StrEnum):
    SCORES = "scores"
    EMBEDDINGS = "embeddings"
    WATERMARK = "watermark"
