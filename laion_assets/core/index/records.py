"""The record the kNN index assets return and the IO manager stores (no faiss or torch import: the code location
loads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from laion_assets.core.index.search import MODALITIES
from laion_assets.core.records import JsonRecord


@dataclass
class IndexFile(JsonRecord):
    name: str
    bytes: int
    sha256: str


@dataclass
class IndexRecord(JsonRecord):
    """What the knn_index / knn_index_all assets made: the folder (a storage key), its files with sizes and
    sha256, the counts, the removal version it was built against, and the build report's flat figures."""

    name: str
    folder: str
    rows: int
    excluded: int
    removal_version: str = ""
    parts: list[str] = field(default_factory=list)
    files: list[IndexFile] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def recall(self) -> float:
        """The lower of the image and text indices' recall@10 (what the `recall` check holds to its floor)."""
        return min(float(self.figures.get(f"{m}_recall_at_10", 0.0)) for m in MODALITIES)

    def metadata(self) -> dict[str, Any]:
        return {**self.figures, "rows": self.rows, "excluded": self.excluded, "removal_version": self.removal_version,
                "bytes": sum(f.bytes for f in self.files), "recall_at_10": round(self.recall(), 4)}
