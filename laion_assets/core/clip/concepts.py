"""The concept filter: "we use the CLIP embeddings of images and texts to filter out to the possible extent the
illegal content" (the LAION-5B post), with the per-concept cosine thresholds LAION's NSFW repository publishes
(`safety_settings.yml`: `nsfw` concepts and `special` concepts for minors, thresholds for OpenAI ViT-L/14).

Each concept is encoded by the embedding CLIP's text tower; a sample whose image embedding is above the threshold
of any `nsfw` concept AND above that of any `special` concept is filtered: `filtered_metadata` removes it (reason
`concept-filter`), so it is never in a release or an index. For every sample the highest similarity of each group
and its concept are kept in the safety scores. The file is a setting (`ModelSettings.concepts`): the laion preset
uses LAION's, the small preset its own, calibrated on the synthetic world (`offline/small_models.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

GROUPS = ("nsfw", "special")
REASON = "concept-filter"


class ConceptFileError(ValueError):
    """A concept file that is not in LAION's layout (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class Concepts:
    """Per group, the concepts and their cosine thresholds, in the file's order."""

    groups: dict[str, dict[str, float]]
    path: str = ""

    def names(self) -> list[str]:
        return [c for g in GROUPS for c in self.groups[g]]


def load_concepts(path: str | os.PathLike[str]) -> Concepts:
    """LAION's layout: `nsfw: {concepts: {text: threshold, ...}}` and `special: {concepts: {...}}` (other keys,
    such as `action`, are ignored)."""
    import yaml

    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"concept file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConceptFileError(f"{path}: not YAML ({err})") from err
    groups: dict[str, dict[str, float]] = {}
    for group in GROUPS:
        concepts = (doc or {}).get(group, {}).get("concepts") if isinstance((doc or {}).get(group), dict) else None
        if not isinstance(concepts, dict) or not concepts:
            raise ConceptFileError(f"{path}: no `{group}: concepts:` mapping of concept to threshold")
        try:
            groups[group] = {str(text): float(t) for text, t in concepts.items()}
        except (TypeError, ValueError) as err:
            raise ConceptFileError(f"{path}: a {group} threshold is not a number ({err})") from err
    return Concepts(groups, path)


@dataclass
class EncodedConcepts:
    """The concepts' text embeddings (L2-normalised, one row per concept) with their thresholds, per group."""

    names: dict[str, list[str]]
    thresholds: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]
    model: str


def encode_concepts(concepts: Concepts, clip: Any) -> EncodedConcepts:
    """Every concept through the CLIP's text tower (a `LoadedClip`: the embedding model)."""
    names = {g: list(concepts.groups[g]) for g in GROUPS}
    return EncodedConcepts(
        names, {g: np.array(list(concepts.groups[g].values()), np.float32) for g in GROUPS},
        {g: np.asarray(clip.encode_texts(names[g]), np.float32) for g in GROUPS}, clip.spec.name)


def concept_columns(images: np.ndarray, encoded: EncodedConcepts) -> dict[str, Any]:
    """Per sample: each group's highest cosine and its concept, and whether the rule filters it."""
    x = np.asarray(images, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if len(x) else x
    out: dict[str, Any] = {}
    above = {}
    for g in GROUPS:
        sims = x @ encoded.embeddings[g].T if len(x) else np.zeros((0, len(encoded.names[g])), np.float32)
        best = sims.argmax(axis=1) if len(x) else np.zeros(0, np.int64)
        out[f"{g}_concept"] = [encoded.names[g][i] for i in best]
        out[f"{g}_similarity"] = sims.max(axis=1) if len(x) else np.zeros(0, np.float32)
        above[g] = (sims > encoded.thresholds[g]).any(axis=1)
    out["concept_filtered"] = above["nsfw"] & above["special"]
    return out
