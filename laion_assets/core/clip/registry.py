"""The model registry: which CLIPs and heads a run uses, from `ModelSettings`.

Production uses LAION-5B's models (open_clip tags, downloaded by open_clip when configured; the two heads from
checkpoint paths). The offline default is a small set the project trains deterministically on its synthetic
world and caches under `data/models/` (`offline/small_models.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from laion_assets.core import paths
from laion_assets.core.clip.specs import LAION_WATERMARK, ClipSpec, WatermarkSpec
from laion_assets.core.settings import ModelSettings
from laion_assets.core.storage import Storage

# LAION-5B's models and thresholds (B/32 for filtering, 0.28 English and 0.26 for the rest; L/14 embeddings).
LAION_EN = ClipSpec("ViT-B-32/openai", "ViT-B-32", "openai", 0.28)
LAION_MULTI = ClipSpec("xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k", "xlm-roberta-base-ViT-B-32",
                       "laion5b_s13b_b90k", 0.26)
LAION_EMBED = ClipSpec("ViT-L-14/openai", "ViT-L-14", "openai")


@dataclass(frozen=True)
class ModelSet:
    clip_en: ClipSpec
    clip_multi: ClipSpec
    embed: ClipSpec
    safety_head: str
    watermark: WatermarkSpec
    safety_threshold: float = 0.5


def _clip_of(spec: ClipSpec, arch: str, pretrained: str, threshold: float | None) -> ClipSpec:
    if arch or pretrained:
        spec = dataclasses.replace(spec, arch=arch or spec.arch, pretrained=pretrained or spec.pretrained)
        spec = dataclasses.replace(spec, name=f"{spec.arch}/{os.path.basename(spec.pretrained)}")
    return spec if threshold is None else dataclasses.replace(spec, threshold=threshold)


def resolve(settings: ModelSettings, log: Callable[[str], None] | None = None, build: bool = True) -> ModelSet:
    """The preset's models with the settings' overrides applied (the small set is built on first use, unless
    `build` is False: then FileNotFoundError)."""
    if settings.preset == "small":
        from laion_assets.core.offline.small_set import small_model_set

        if build:
            from laion_assets.core.offline.small_models import build_small_models

            build_small_models(settings.models_dir, log)
        base = small_model_set(settings.models_dir)
    else:
        base = ModelSet(LAION_EN, LAION_MULTI, LAION_EMBED, "", LAION_WATERMARK)
    watermark = base.watermark
    if settings.watermark_arch or settings.watermark_checkpoint or settings.watermark_image_size:
        watermark = dataclasses.replace(
            watermark, arch=settings.watermark_arch or watermark.arch,
            checkpoint=settings.watermark_checkpoint or watermark.checkpoint,
            image_size=settings.watermark_image_size or watermark.image_size)
    s = settings
    return ModelSet(
        clip_en=_clip_of(base.clip_en, s.clip_en_arch, s.clip_en_pretrained, s.threshold_en),
        clip_multi=_clip_of(base.clip_multi, s.clip_multi_arch, s.clip_multi_pretrained, s.threshold_multi),
        embed=_clip_of(base.embed, s.embed_arch, s.embed_pretrained, None),
        safety_head=s.safety_head or base.safety_head,
        watermark=watermark,
    )


# --- the registry file: what operators change at run time ------------------------------------------------------

class RegistryError(ValueError):
    """A registry entry that is not a model setting, or of the wrong type."""


def load_overrides(store: Storage) -> dict[str, Any]:
    """The registry file's overrides of the model settings ({} when there is none)."""
    key = paths.model_registry()
    return store.read_json(key)["overrides"] if store.exists(key) else {}


def apply_overrides(settings: ModelSettings, overrides: dict[str, Any]) -> ModelSettings:
    fields = {f.name: f for f in dataclasses.fields(ModelSettings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise RegistryError(f"not model settings: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    return dataclasses.replace(settings, **overrides)


def save_overrides(store: Storage, overrides: dict[str, Any], note: str = "") -> dict[str, Any]:
    """Validate and store the registry's overrides (the whole set: later calls replace earlier ones)."""
    apply_overrides(ModelSettings(), overrides)  # refuse an unknown or mistyped entry before writing
    doc = {"overrides": overrides, "note": note, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    store.write_json(paths.model_registry(), doc)
    return doc


def identity(chosen: ModelSet) -> dict[str, Any]:
    """What the CLIP stage's outputs depend on: each model's weights and each threshold. Its hash is the model
    registry's data version: when it changes, the stage is re-run (a threshold change only re-filters)."""
    from laion_assets.core.clip.specs import file_sha256, weights_id

    def head(path: str) -> str:
        return f"sha256:{file_sha256(path)}" if path and os.path.isfile(path) else path

    return {
        "clip_en": weights_id(chosen.clip_en.arch, chosen.clip_en.pretrained),
        "threshold_en": chosen.clip_en.threshold,
        "clip_multi": weights_id(chosen.clip_multi.arch, chosen.clip_multi.pretrained),
        "threshold_multi": chosen.clip_multi.threshold,
        "embed": weights_id(chosen.embed.arch, chosen.embed.pretrained),
        "safety_head": head(chosen.safety_head),
        "safety_threshold": chosen.safety_threshold,
        "watermark": head(chosen.watermark.checkpoint),
        "watermark_threshold": chosen.watermark.threshold,
    }


# What each CLIP-stage asset depends on, of the identity: a change re-runs only the assets it touches.
PARTS = {
    "clip_filter_models": ("clip_en", "threshold_en", "clip_multi", "threshold_multi"),
    "embedding_model": ("embed",),
    "safety_model": ("safety_head", "safety_threshold"),
    "watermark_model": ("watermark", "watermark_threshold"),
}


def versions(settings: ModelSettings) -> dict[str, str]:
    """The data version of each part of the registry, without building anything ("<preset>:unbuilt" while the
    small set is missing)."""
    import hashlib
    import json

    try:
        doc = identity(resolve(settings, build=False))
    except FileNotFoundError:
        return {part: f"{settings.preset}:unbuilt" for part in PARTS}
    return {part: hashlib.sha256(json.dumps({k: doc[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
            for part, keys in PARTS.items()}
