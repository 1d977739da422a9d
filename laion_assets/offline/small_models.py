"""The small offline model set, kept apart from production inference: two small CLIPs (English; multilingual on
en/de/fr/es captions), a safety head, an aesthetic head, a watermark classifier and a concept file, trained or
calibrated deterministically on the synthetic world (shapes, colours, positions with matching captions) in about
2.5 minutes on 2 cores, then cached with a `.json` card each (calibrated threshold, held-out scores).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from laion_assets.core.clip import checkpoints
from laion_assets.core.clip.aesthetic import save_aesthetic_head, train_aesthetic_head
from laion_assets.core.clip.heads import load_head
from laion_assets.core.clip.models import (
    OPENAI_MEAN,
    OPENAI_STD,
    SMALL_ARCH,
    ClipSpec,
    LoadedClip,
    load_clip,
    register_small_arch,
)
from laion_assets.core.clip.registry import ModelSet, small_files, small_model_set
from laion_assets.core.clip.safety import load_safety_head, punsafe, save_safety_head, train_safety_head
from laion_assets.core.clip.watermark import (
    WatermarkSpec,
    pwatermark,
    save_watermark,
    train_watermark,
    watermark_transform,
)
from laion_assets.core.progress import Log
from laion_assets.core.settings import DEFAULT_MODELS_DIR
from laion_assets.core.storage import atomic_path
from laion_assets.offline.synthetic import LANGUAGES

SMALL_WATERMARK_ARCH = "mobilenetv3_small_050"
SMALL_WATERMARK_SIZE = 96


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
    build_small_models(models_dir, log)
    return small_model_set(models_dir)


def build_small_models(models_dir: str | os.PathLike[str] = DEFAULT_MODELS_DIR, log: Callable | None = None) -> None:
    """Train whatever of the small set is missing (deterministically; about 2.5 minutes on 2 cores for all)."""
    paths = small_files(models_dir)
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
            if not paths["aesthetic"].exists():
                say("building the small aesthetic head")
                _build_aesthetic(embed, paths["aesthetic"], say)
            if not paths["concepts"].exists():
                say("calibrating the small concept file")
                _build_concepts(embed, paths["concepts"], say)
        finally:
            torch.set_num_threads(threads)


def _safety_set(embed: ClipSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    model = load_clip(embed)
    images, scenes, _ = synthetic_pairs(n, seed, model.image_size, ("en",))
    labels = np.array([s.color == SAFETY_CONCEPT for s in scenes], dtype=np.float32)
    return model.encode_pixels(images), labels


def _build_safety(embed: ClipSpec, out: Path, say: Callable) -> None:
    x, y = _safety_set(embed, 3000, seed=11)
    head = train_safety_head(x, y, epochs=40, seed=0, log=say)
    hx, hy = _safety_set(embed, 600, seed=12)
    accuracy = float(((punsafe(head, hx) > 0.5) == (hy > 0.5)).mean())
    save_safety_head(head, out, {"name": "small-safety", "embedding_model": embed.name,
                                 "concept": SAFETY_CONCEPT, "held_out_accuracy": accuracy})
    say(f"small safety head: held-out accuracy {accuracy:.3f}")
    load_safety_head(out)  # fail here, not in a later run, if it does not load


WARM, DARK = ("red", "orange", "yellow"), ("black", "blue", "purple")


def aesthetic_of(scene: Any) -> float:
    """The synthetic world's aesthetic score: 1.5, 4 more for a warm shape, 3 more on a dark background (1.5, 4.5,
    5.5 or 8.5). Additive in what a 32 px CLIP sees, since V2's predictor (our head's shape) has no activation: it
    is linear in the embedding."""
    return 1.5 + 4.0 * (scene.color in WARM) + 3.0 * (scene.background in DARK)


def _aesthetic_set(embed: ClipSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    model = load_clip(embed)
    images, scenes, _ = synthetic_pairs(n, seed, model.image_size, ("en",))
    return model.encode_pixels(images), np.array([aesthetic_of(s) for s in scenes], np.float32)


def _build_aesthetic(embed: ClipSpec, out: Path, say: Callable) -> None:
    x, y = _aesthetic_set(embed, 3000, seed=41)
    head = train_aesthetic_head(x, y, epochs=40, seed=0, lr=3e-3, log=say)
    hx, hy = _aesthetic_set(embed, 600, seed=42)
    with torch.inference_mode():
        error = float(np.abs(head(torch.nn.functional.normalize(torch.from_numpy(hx), dim=-1)).numpy() - hy).mean())
    save_aesthetic_head(head, out, {"name": "small-aesthetic", "embedding_model": embed.name,
                                    "held_out_mean_abs_error": error})
    say(f"small aesthetic head: held-out mean absolute error {error:.3f}")
    load_head(out, "aesthetic")  # fail here, not in a later run, if it does not load


# The small world's stand-ins for LAION's concept groups: `nsfw` is a red shape (the safety head's concept),
# `special` a white background; the concepts are the world's own captions (a 32 px CLIP reads whole captions far
# better than words), so the rule filters red shapes on white backgrounds.
CONCEPT_NSFW_COLOR, CONCEPT_SPECIAL_BACKGROUND = "red", "white"


def small_concepts() -> dict[str, list[str]]:
    from laion_assets.offline.synthetic import COLORS, POSITIONS, SHAPES, Scene

    return {
        "nsfw": [Scene(s, CONCEPT_NSFW_COLOR, bg, p).caption("en") for s in SHAPES for bg in COLORS
                 if bg != CONCEPT_NSFW_COLOR for p in POSITIONS],
        "special": [Scene(s, c, CONCEPT_SPECIAL_BACKGROUND, p).caption("en") for s in SHAPES for c in COLORS
                    if c != CONCEPT_SPECIAL_BACKGROUND for p in POSITIONS]}


def _build_concepts(embed: ClipSpec, out: Path, say: Callable) -> None:
    """One threshold per group (each concept gets its group's), at the best separation of the group's property by
    the highest similarity over its concepts, on rendered scenes; written in LAION's safety_settings.yml layout."""
    import yaml

    model = load_clip(embed)
    images, scenes, _ = synthetic_pairs(1500, 51, model.image_size, ("en",))
    x = model.encode_pixels(images)
    has = {"nsfw": np.array([s.color == CONCEPT_NSFW_COLOR for s in scenes]),
           "special": np.array([s.background == CONCEPT_SPECIAL_BACKGROUND for s in scenes])}
    doc: dict[str, Any] = {}
    for group, texts in small_concepts().items():
        best = (x @ model.encode_texts(texts).T).max(axis=1)
        threshold = round(calibrate_threshold(best[has[group]], best[~has[group]]), 4)
        doc[group] = {"concepts": dict.fromkeys(texts, threshold)}
        say(f"small concepts: {group} threshold {threshold} over {len(texts)} captions")
    doc["nsfw"]["action"] = "remove"
    with atomic_path(out) as tmp, open(tmp, "w") as fh:
        fh.write("# The small preset's concept filter, calibrated on the synthetic world (offline/small_models.py):\n"
                 f"# nsfw = a {CONCEPT_NSFW_COLOR} shape, special = a {CONCEPT_SPECIAL_BACKGROUND} background.\n")
        yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True)


def _build_watermark(out: Path, say: Callable) -> None:
    spec = WatermarkSpec("small-watermark", SMALL_WATERMARK_ARCH, str(out), SMALL_WATERMARK_SIZE, 0.8)
    images, labels = synthetic_watermark_set(1600, seed=21, size=spec.image_size)
    model = train_watermark(images, labels, spec.arch, epochs=8, seed=0, log=say)
    hx, hy = synthetic_watermark_set(400, seed=22, size=spec.image_size)
    accuracy = float(((pwatermark(model, hx) > 0.5) == (hy.numpy() == 1)).mean())
    save_watermark(model, spec, {"held_out_accuracy": accuracy})
    say(f"small watermark classifier: held-out accuracy {accuracy:.3f}")


# --- the small CLIPs ---------------------------------------------------------------------------------

def synthetic_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A rendered scene as the download stage stores it (padded square) and CLIP preprocessing sees it."""
    from laion_assets.core.download.resize import pad_square

    arr = np.asarray(pad_square(img).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def synthetic_pairs(n: int, seed: int, size: int, languages: tuple[str, ...], watermark_rate: float = 0.0
                    ) -> tuple[torch.Tensor, list[Any], list[str]]:
    """n rendered scenes (small renders: cheap, and the model sees 32 px anyway), their scenes and captions."""
    from laion_assets.offline.synthetic import random_scene, render

    rng = random.Random(seed)
    images, scenes, captions = [], [], []
    for i in range(n):
        scene = random_scene(rng)
        w = rng.randint(96, 160)
        h = rng.randint(72, 120)
        mark = "(c) stock" if rng.random() < watermark_rate else None
        images.append(synthetic_tensor(render(scene, (w, h), seed=seed * 1_000_003 + i, watermark=mark), size))
        scenes.append(scene)
        captions.append(scene.caption(rng.choice(languages)))
    return torch.stack(images), scenes, captions


def calibrate_threshold(matched: np.ndarray, shuffled: np.ndarray) -> float:
    """The threshold that best separates matched from shuffled pairs (max of TPR + TNR)."""
    candidates = np.unique(np.concatenate([matched, shuffled]))
    best, best_t = -1.0, 0.0
    for t in candidates:
        score = (matched >= t).mean() + (shuffled < t).mean()
        if score > best:
            best, best_t = score, float(t)
    return best_t


def train_small_clip(name: str, languages: tuple[str, ...], out: str | os.PathLike[str], steps: int = 700,
                     batch_size: int = 128, seed: int = 0, log: Log | None = None) -> ClipSpec:
    """Train the small CLIP on the synthetic world, calibrate its threshold on held-out pairs, save it."""
    import open_clip

    register_small_arch()
    torch.manual_seed(seed)
    model = open_clip.create_model(SMALL_ARCH, pretrained=None)
    tokenizer = open_clip.get_tokenizer(SMALL_ARCH)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    pool_images, pool_scenes, _ = synthetic_pairs(4096, seed + 1, size, languages)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    loss_fn = open_clip.ClipLoss()
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = rng.sample(range(len(pool_images)), batch_size)
        texts = tokenizer([pool_scenes[i].caption(rng.choice(languages)) for i in idx])
        out_img, out_txt, scale = model(pool_images[idx], texts)[:3]
        loss = loss_fn(out_img, out_txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    preprocess = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    loaded = LoadedClip(ClipSpec(name, SMALL_ARCH, ""), model, preprocess, tokenizer, torch.device("cpu"))
    matched, shuffled = held_out_similarities(loaded, 600, seed + 2, languages)
    threshold = calibrate_threshold(matched, shuffled)
    spec = ClipSpec(name, SMALL_ARCH, str(out), threshold)
    save_clip(model, spec, {"languages": list(languages), "steps": steps, "seed": seed,
                            "held_out_matched_kept": float((matched >= threshold).mean()),
                            "held_out_shuffled_dropped": float((shuffled < threshold).mean())})
    return spec


def held_out_similarities(model: LoadedClip, n: int, seed: int, languages: tuple[str, ...]
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of n held-out matched pairs and of the same images with shuffled captions, the images
    taking the real path: photo-sized render, JPEG, the download stage's 256 px border, CLIP preprocessing
    (so that the calibrated threshold holds for what the pipeline stores)."""
    from laion_assets.core.download.resize import process_image
    from laion_assets.core.settings import ResizeSettings
    from laion_assets.offline.synthetic import jpeg_bytes, random_scene, render

    rng = random.Random(seed)
    tensors, captions = [], []
    for i in range(n):
        scene = random_scene(rng)
        size = (rng.randint(320, 640), rng.randint(240, 480))
        stored = process_image(jpeg_bytes(render(scene, size, seed=seed * 1_000_003 + i)), ResizeSettings()).data
        with Image.open(io.BytesIO(stored)) as img:
            tensors.append(model.preprocess(img.convert("RGB")))
        captions.append(scene.caption(rng.choice(languages)))
    img = model.encode_pixels(torch.stack(tensors))
    shuffled = captions[1:] + captions[:1]
    return (img * model.encode_texts(captions)).sum(1), (img * model.encode_texts(shuffled)).sum(1)


def save_clip(model: Any, spec: ClipSpec, card: dict[str, Any]) -> None:
    checkpoints.save(spec.pretrained, {"state_dict": model.state_dict()},
                     {"name": spec.name, "arch": spec.arch, "threshold": spec.threshold, **card})


# --- the small heads ---------------------------------------------------------------------------------

# The synthetic world's stand-in for "unsafe": every image whose shape is red. (Colour is what a 32 px CLIP
# sees best; the head only has to find a concept in the embedding, as LAION's does.)
SAFETY_CONCEPT = "red"


def synthetic_watermark_set(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the renders carry a text mark; returned preprocessed as the watermark model sees shards."""
    from laion_assets.core.download.resize import pad_square
    from laion_assets.offline.synthetic import random_scene, render

    rng = random.Random(seed)
    transform = watermark_transform(size)
    images, labels = [], []
    for i in range(n):
        marked = i % 2 == 1
        w, h = rng.randint(128, 200), rng.randint(96, 150)
        mark = rng.choice(["(c) stock", "SAMPLE", "watermark", "shutterpix"]) if marked else None
        img = render(random_scene(rng), (w, h), seed=seed * 1_000_003 + i, watermark=mark)
        buf = io.BytesIO()
        pad_square(img).save(buf, format="JPEG", quality=90)  # as stored in the shards
        images.append(transform(Image.open(buf).convert("RGB")))
        labels.append(int(marked))
    return torch.stack(images), torch.tensor(labels)
