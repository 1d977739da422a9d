"""Where the small offline model set lives and what it is, without importing torch (the model registry's version is
computed from it in sensors)."""

from __future__ import annotations

import os
from pathlib import Path

from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.specs import ClipSpec, watermark_spec_from_checkpoint
from laion_assets.core.settings import DEFAULT_MODELS_DIR


def model_files(models_dir: str | os.PathLike[str]) -> dict[str, Path]:
    root = Path(models_dir)
    return {"clip_en": root / "small-clip-en.pt", "clip_multi": root / "small-clip-multi.pt",
            "safety": root / "small-safety.pt", "watermark": root / "small-watermark.pt"}


def small_model_set(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR) -> ModelSet:
    """The small offline set as built; FileNotFoundError when it is not built yet."""
    paths = model_files(models_dir)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the small models are not built yet ({', '.join(missing)}): run "
                                "`laion-assets small-models` or `make models`")
    return ModelSet(
        clip_en=ClipSpec.from_checkpoint(paths["clip_en"]),
        clip_multi=ClipSpec.from_checkpoint(paths["clip_multi"]),
        # The stand-in for ViT-L/14: the small multilingual CLIP (captions come in four languages).
        embed=ClipSpec.from_checkpoint(paths["clip_multi"]),
        safety_head=str(paths["safety"]),
        watermark=watermark_spec_from_checkpoint(paths["watermark"]),
    )


