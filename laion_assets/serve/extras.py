"""What clip-retrieval's back end adds to a query, for the indices it fits: `aesthetic_score` (0..9) adds that
rating's LAION-Aesthetics V1 embedding times `aesthetic_weight` to the query vector and renormalises;
`use_violence_detector` drops results whose embedding is nearer the second of the two violence prompts.

Both files are embeddings of one CLIP (LAION's: OpenAI ViT-L/14): they are applied to an index only when its
embedding model (recorded in its report, from the embeddings' metadata) is that CLIP and its dimension theirs;
otherwise the request's fields are ignored, and /indices-status says why. ClipClient sends aesthetic_score=9 and
use_violence_detector=True by default, so such a query must still succeed on any index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RATINGS = 10
DEFAULT_WEIGHT = 0.5  # ClipClient's aesthetic_weight default (clip-retrieval's back end has none)
FEATURES = ("aesthetic_score", "use_violence_detector")


@dataclass
class SearchExtras:
    """The rating embeddings (10 x dim) and violence prompts (2 x dim) of one embedding model, or why not."""

    model: str = ""
    ratings: np.ndarray | None = None
    violence: np.ndarray | None = None
    problems: dict[str, str] = field(default_factory=dict)  # feature -> why it is not available

    def verdict(self, index: Any) -> dict[str, dict[str, Any]]:
        """Per feature, whether it applies to this index, and why not."""
        model = str(getattr(index, "report", {}).get("model", "") or "")
        out = {}
        for feature, array in (("aesthetic_score", self.ratings), ("use_violence_detector", self.violence)):
            if array is None:
                out[feature] = {"applied": False, "reason": self.problems.get(feature, "not configured")}
            elif int(array.shape[1]) != int(index.dim):
                out[feature] = {"applied": False, "reason": f"its embeddings are {array.shape[1]}-d ({self.model}), "
                                                            f"the index's {index.dim}-d: ignored"}
            elif not model:
                out[feature] = {"applied": False, "reason": "the index does not record its embedding model "
                                                            f"(they are {self.model}'s): ignored"}
            elif model != self.model:
                out[feature] = {"applied": False, "reason": f"the index holds {model} embeddings, these are "
                                                            f"{self.model}'s: ignored"}
            else:
                out[feature] = {"applied": True, "model": model}
        return out

    def query(self, vector: np.ndarray, index: Any, score: int | None, weight: float | None) -> np.ndarray:
        """The query with the rating's embedding added (when asked and it applies), renormalised."""
        if score is None or self.ratings is None or not self.verdict(index)["aesthetic_score"]["applied"]:
            return vector
        q = np.asarray(vector, np.float32) + self.ratings[score] * np.float32(
            DEFAULT_WEIGHT if weight is None else weight)
        return q / max(float(np.linalg.norm(q)), 1e-12)

    def violence_prompts(self, index: Any, asked: bool) -> np.ndarray | None:
        if not asked or self.violence is None or not self.verdict(index)["use_violence_detector"]["applied"]:
            return None
        return self.violence


def load_extras(settings: Any) -> SearchExtras:
    """The model set's rating embeddings and violence prompts (ModelSettings); a file missing or wrong is a reason
    in /indices-status, never a failure of the service."""
    from laion_assets.core.clip.model_files import ModelFileError, verify
    from laion_assets.core.clip.registry import laion_root, preset_files, resolve

    try:
        chosen = resolve(settings, check=False)
    except FileNotFoundError as err:
        return SearchExtras(problems=dict.fromkeys(FEATURES, str(err)))
    extras = SearchExtras(model=chosen.embed.name)
    pinned = {str(laion_root(settings.models_dir) / f.path): f for f in preset_files(settings, chosen)}

    def load(path: str, feature: str, rows: int) -> np.ndarray | None:
        ratings = feature == "aesthetic_score"
        if not path:
            setting = "rating_embeddings" if ratings else "violence_prompts"
            extras.problems[feature] = f"no file configured (ModelSettings.{setting})"
            return None
        files = [os.path.join(path, f"rating{k}.npy") for k in range(RATINGS)] if ratings else [path]
        try:
            for f in files:
                if f in pinned:
                    verify(Path(f), pinned[f], settings.preset, settings.models_dir)
            arrays = [np.atleast_2d(np.asarray(np.load(f), np.float32)) for f in files]
        except (FileNotFoundError, ModelFileError, ValueError, OSError) as err:
            extras.problems[feature] = str(err)
            return None
        array = np.concatenate(arrays)
        if array.shape[0] != rows:
            extras.problems[feature] = f"{path}: {array.shape[0]} vectors, not {rows}"
            return None
        return array

    extras.ratings = load(chosen.rating_embeddings, "aesthetic_score", RATINGS)
    extras.violence = load(chosen.violence_prompts, "use_violence_detector", 2)
    return extras
