"""The model registry's content: which CLIPs and heads a run uses, and the small offline set.

Production uses LAION-5B's models (open_clip tags, downloaded by open_clip when configured; the two heads
from checkpoint paths). The offline default is a small set the project trains deterministically on its
synthetic world in about two minutes on 2 cores and caches under `data/models/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from laion_assets.core.clip import ClipSpec, load_clip, synthetic_pairs, train_small_clip
from laion_assets.core.synthetic import LANGUAGES
from laion_assets.core.tags import (
    SAFETY_CONCEPT,
    WatermarkSpec,
    load_safety_head,
    punsafe,
    pwatermark,
    save_safety_head,
    save_watermark,
    synthetic_watermark_set,
    train_safety_head,
    train_watermark,
    watermark_spec_from_checkpoint,
)

DEFAULT_MODELS_DIR = "data/models"
SMALL_WATERMARK_ARCH = "mobilenetv3_small_050"
SMALL_WATERMARK_SIZE = 96


@dataclass(frozen=True)
class ModelSet:
    clip_en: ClipSpec
    clip_multi: ClipSpec
    embed: ClipSpec
    safety_head: str
    watermark: WatermarkSpec
    safety_threshold: float = 0.5


def _paths(models_dir: str | os.PathLike[str]) -> dict[str, Path]:
    root = Path(models_dir)
    return {"clip_en": root / "small-clip-en.pt", "clip_multi": root / "small-clip-multi.pt",
            "safety": root / "small-safety.pt", "watermark": root / "small-watermark.pt"}


@contextlib.contextmanager
def _lock(models_dir: Path) -> Iterator[None]:
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two runs that both miss the models build them once
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def small_models(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR, log: Callable | None = None) -> ModelSet:
    """The small offline set, built (deterministically) where missing."""
    paths = _paths(models_dir)
    say = log or (lambda _m: None)
    with _lock(Path(models_dir)), torch.random.fork_rng():
        threads = torch.get_num_threads()
        try:
            if not paths["clip_en"].exists():
                say(f"building the small English CLIP (once; cached in {models_dir})")
                train_small_clip("small-clip-en", ("en",), paths["clip_en"], steps=500, seed=0, log=say)
            if not paths["clip_multi"].exists():
                say("building the small multilingual CLIP")
                train_small_clip("small-clip-multi", LANGUAGES, paths["clip_multi"], steps=700, seed=1, log=say)
            embed = ClipSpec.from_checkpoint(paths["clip_multi"])
            if not paths["safety"].exists():
                say("building the small safety head")
                _build_safety(embed, paths["safety"], say)
            if not paths["watermark"].exists():
                say("building the small watermark classifier")
                _build_watermark(paths["watermark"], say)
        finally:
            torch.set_num_threads(threads)
    return ModelSet(
        clip_en=ClipSpec.from_checkpoint(paths["clip_en"]),
        clip_multi=ClipSpec.from_checkpoint(paths["clip_multi"]),
        # The stand-in for ViT-L/14: the small multilingual CLIP (captions come in four languages).
        embed=embed,
        safety_head=str(paths["safety"]),
        watermark=watermark_spec_from_checkpoint(paths["watermark"]),
    )


def _safety_set(embed: ClipSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    model = load_clip(embed)
    images, scenes, _ = synthetic_pairs(n, seed, model.image_size, ("en",))
    labels = np.array([s.color == SAFETY_CONCEPT for s in scenes], dtype=np.float32)
    return model.encode_images(images), labels


def _build_safety(embed: ClipSpec, out: Path, say: Callable) -> None:
    x, y = _safety_set(embed, 3000, seed=11)
    head = train_safety_head(x, y, epochs=40, seed=0, log=say)
    hx, hy = _safety_set(embed, 600, seed=12)
    accuracy = float(((punsafe(head, hx) > 0.5) == (hy > 0.5)).mean())
    save_safety_head(head, out, {"name": "small-safety", "embedding_model": embed.name,
                                 "concept": SAFETY_CONCEPT, "held_out_accuracy": accuracy})
    say(f"small safety head: held-out accuracy {accuracy:.3f}")
    load_safety_head(out)  # fail here, not in a later run, if it does not load


def _build_watermark(out: Path, say: Callable) -> None:
    spec = WatermarkSpec("small-watermark", SMALL_WATERMARK_ARCH, str(out), SMALL_WATERMARK_SIZE, 0.8)
    images, labels = synthetic_watermark_set(1600, seed=21, size=spec.image_size)
    model = train_watermark(images, labels, spec.arch, epochs=8, seed=0, log=say)
    hx, hy = synthetic_watermark_set(400, seed=22, size=spec.image_size)
    accuracy = float(((pwatermark(model, hx) > 0.5) == (hy.numpy() == 1)).mean())
    save_watermark(model, spec, {"held_out_accuracy": accuracy})
    say(f"small watermark classifier: held-out accuracy {accuracy:.3f}")
