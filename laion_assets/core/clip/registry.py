"""The model registry: which CLIPs and heads a run uses, from `ModelSettings`.

Production uses LAION-5B's models (open_clip tags, downloaded by open_clip when configured; the two heads from
checkpoint paths). The offline default is a small set the project trains deterministically on its synthetic
world (`laion-assets small-models`, `laion_assets/offline/small_models.py`) into `data/models/`; the registry only
reads its cards and never trains: a missing set is a clear error naming the command that builds it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from laion_assets.core import paths
from laion_assets.core.clip.specs import LAION_WATERMARK, ClipSpec, WatermarkSpec, watermark_spec_from_checkpoint
from laion_assets.core.settings import DEFAULT_MODELS_DIR, ModelSettings
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


def small_files(models_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Where the small offline set's checkpoints are (each with its `.json` card beside it)."""
    root = Path(models_dir)
    return {"clip_en": root / "small-clip-en.pt", "clip_multi": root / "small-clip-multi.pt",
            "safety": root / "small-safety.pt", "watermark": root / "small-watermark.pt"}


def small_model_set(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR) -> ModelSet:
    """The small offline set as built; FileNotFoundError naming the command that builds it when it is missing."""
    files = small_files(models_dir)
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the small models are not built yet ({', '.join(missing)}): run "
                                "`laion-assets small-models` or `make models`")
    return ModelSet(
        clip_en=ClipSpec.from_checkpoint(files["clip_en"]),
        clip_multi=ClipSpec.from_checkpoint(files["clip_multi"]),
        # The stand-in for ViT-L/14: the small multilingual CLIP (captions come in four languages).
        embed=ClipSpec.from_checkpoint(files["clip_multi"]),
        safety_head=str(files["safety"]),
        watermark=watermark_spec_from_checkpoint(files["watermark"]),
    )


def resolve(settings: ModelSettings) -> ModelSet:
    """The preset's models with the settings' overrides applied (FileNotFoundError when the small set is not
    built)."""
    base = (small_model_set(settings.models_dir) if settings.preset == "small"
            else ModelSet(LAION_EN, LAION_MULTI, LAION_EMBED, "", LAION_WATERMARK))
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


# The registry's parts, each a set of the identity's entries: each CLIP-stage output depends on one part, so that a
# change re-runs only what it touches.
PARTS = {
    "filter": ("clip_en", "threshold_en", "clip_multi", "threshold_multi"),
    "embed": ("embed",),
    "safety": ("safety_head", "safety_threshold"),
    "watermark": ("watermark", "watermark_threshold"),
}


def versions(settings: ModelSettings) -> dict[str, str]:
    """The data version of each part of the registry, without building anything ("<preset>:unbuilt" while the
    small set is missing)."""
    import hashlib
    import json

    try:
        doc = identity(resolve(settings))
    except FileNotFoundError:
        return {part: f"{settings.preset}:unbuilt" for part in PARTS}
    return {part: hashlib.sha256(json.dumps({k: doc[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
            for part, keys in PARTS.items()}
