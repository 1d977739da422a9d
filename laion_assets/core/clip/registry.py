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

from laion_assets.core.clip.models import ClipSpec
from laion_assets.core.clip.watermark import LAION_WATERMARK, WatermarkSpec
from laion_assets.core.settings import ModelSettings

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


def resolve(settings: ModelSettings, log: Callable[[str], None] | None = None) -> ModelSet:
    """The preset's models with the settings' overrides applied (the small set is built on first use)."""
    if settings.preset == "small":
        from laion_assets.core.offline.small_models import small_models

        base = small_models(settings.models_dir, log)
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
