"""The CLIP stage: image-text similarity filtering and embeddings, on the tar shards of the download stage.

Models are open_clip architectures with a pretrained tag or a checkpoint path. Nothing downloads unless a
pretrained tag that needs it is configured: the offline default is a small CLIP the project trains on its
synthetic image-caption world (`build_small_clip`), registered with open_clip as `laion-assets-small`.

Decoding runs in DataLoader workers that split the shards between them, so the model is fed while images
are decoded; on CUDA the model runs channels-last under bf16 autocast with pinned, non-blocking copies.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

SMALL_ARCH = "laion-assets-small"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "models"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Log = Callable[[str], None]


@dataclass(frozen=True)
class ClipSpec:
    """One CLIP model: what to load and the similarity threshold that goes with it."""

    name: str  # recorded with every score
    arch: str
    pretrained: str  # an open_clip pretrained tag or a checkpoint path
    threshold: float = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> ClipSpec:
        """A checkpoint written by `save_clip`, with the threshold calibrated when it was trained."""
        card = json.loads(Path(str(path) + ".json").read_text())
        return cls(card["name"], card["arch"], str(path), float(card["threshold"]))


# LAION-5B's models and thresholds (B/32 for filtering, 0.28 English and 0.26 for the rest; L/14 embeddings).
LAION_EN = ClipSpec("ViT-B-32/openai", "ViT-B-32", "openai", 0.28)
LAION_MULTI = ClipSpec("xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k", "xlm-roberta-base-ViT-B-32",
                       "laion5b_s13b_b90k", 0.26)
LAION_EMBED = ClipSpec("ViT-L-14/openai", "ViT-L-14", "openai")


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@dataclass
class LoadedClip:
    spec: ClipSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = self.model.encode_image(images)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def register_small_arch() -> None:
    import open_clip

    if SMALL_ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{SMALL_ARCH}.json")


def load_clip(spec: ClipSpec, device: torch.device | str = "cpu") -> LoadedClip:
    """The model, its preprocessing and tokenizer; weights from the tag or checkpoint (nothing else)."""
    import open_clip

    register_small_arch()
    device = torch.device(device)
    if spec.pretrained and os.sep in spec.pretrained and not os.path.exists(spec.pretrained):
        raise FileNotFoundError(f"checkpoint of model {spec.name!r} not found: {spec.pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.arch, pretrained=spec.pretrained or None, device=device)
    model.eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return LoadedClip(spec, model, preprocess, open_clip.get_tokenizer(spec.arch), device)


# --- reading the download stage's shards -----------------------------------------------------------

@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def iter_shard_samples(tar_path: str, keep: frozenset[str] | None = None) -> Iterator[Sample]:
    """The samples of one webdataset tar (members grouped by key, in file order)."""
    current: Sample | None = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field_name = member.name.rpartition("/")[2].partition(".")
            if current is not None and key != current.key:
                yield current
                current = None
            if keep is not None and key not in keep:
                continue
            if current is None:
                current = Sample(key, b"", "")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if field_name in ("jpg", "jpeg", "png", "webp"):
                current.image = data
            elif field_name == "txt":
                current.caption = data.decode("utf-8", "replace")
            elif field_name == "json":
                current.meta = json.loads(data)
    if current is not None:
        yield current


class _Decoded(torch.utils.data.IterableDataset):
    """Decoded, preprocessed samples; DataLoader workers take every n-th shard."""

    def __init__(self, tar_paths: list[str], transform: Any, size: int, keep: frozenset[str] | None) -> None:
        self.tar_paths, self.transform, self.size, self.keep = tar_paths, transform, size, keep

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, str, str, str, str]]:
        info = torch.utils.data.get_worker_info()
        paths = self.tar_paths if info is None else self.tar_paths[info.id::info.num_workers]
        for path in paths:
            for s in iter_shard_samples(path, self.keep):
                error = ""
                try:
                    with Image.open(io.BytesIO(s.image)) as img:
                        tensor = self.transform(img.convert("RGB"))
                except Exception as err:  # noqa: BLE001 - one bad image is one failed row
                    tensor = torch.zeros(3, self.size, self.size)
                    error = f"cannot decode image: {type(err).__name__}: {err}"
                yield (s.key, tensor, error, s.caption, str(s.meta.get("language") or ""), str(s.meta.get("url") or ""))


@dataclass
class Batch:
    keys: list[str]
    images: torch.Tensor
    errors: list[str]
    captions: list[str]
    languages: list[str]
    urls: list[str]


def _collate(items: list[tuple[str, torch.Tensor, str, str, str, str]]) -> Batch:
    keys, tensors, errors, captions, languages, urls = zip(*items, strict=True)
    return Batch(list(keys), torch.stack(tensors), list(errors), list(captions), list(languages), list(urls))


def _one_thread(_worker_id: int) -> None:
    # A decode worker needs one thread; torch's default (all cores) would fight the model for them.
    torch.set_num_threads(1)


def decoded_batches(tar_paths: list[str], transform: Any, size: int, batch_size: int, workers: int,
                    keep: frozenset[str] | None = None, pin: bool = False) -> Iterator[Batch]:
    dataset = _Decoded(sorted(tar_paths), transform, size, keep)
    workers = max(0, min(workers, len(tar_paths)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=pin,
        prefetch_factor=4 if workers else None, persistent_workers=False, worker_init_fn=_one_thread,
    )
    yield from loader


# --- similarity scores -----------------------------------------------------------------------------

SCORE_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("language", pa.string()),
    ("model", pa.string()), ("similarity", pa.float32()), ("threshold", pa.float32()), ("keep", pa.bool_()),
    ("status", pa.string()), ("error_message", pa.string()),
])


@dataclass
class StageReport:
    samples: int = 0
    failed: int = 0
    kept: int = 0
    seconds: float = 0.0
    by_model: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return {"samples": self.samples, "failed_to_decode": self.failed, "kept": self.kept,
                "kept_fraction": round(self.kept / self.samples, 4) if self.samples else 0.0,
                "seconds": round(self.seconds, 2), "images_per_s": round(rate, 1), "by_model": self.by_model}


def is_english(language: str) -> bool:
    return language == "en"


def score_shards(tar_paths: list[str], english: LoadedClip, multilingual: LoadedClip, batch_size: int = 256,
                 workers: int = 1, log: Log | None = None) -> tuple[pa.Table, StageReport]:
    """Similarity of every sample's image and caption: English captions with the English CLIP, the rest
    (other and undetected languages) with the multilingual one. Every sample gets a row."""
    if english.image_size != multilingual.image_size:
        raise ValueError(f"the English and multilingual CLIPs must share an input size "
                         f"({english.image_size} vs {multilingual.image_size})")
    start = time.perf_counter()
    report = StageReport()
    rows: list[dict[str, Any]] = []
    pin = english.device.type == "cuda"
    for batch in decoded_batches(tar_paths, english.preprocess, english.image_size, batch_size, workers, pin=pin):
        sims = np.full(len(batch.keys), np.nan, dtype=np.float32)
        chosen = [english if is_english(lang) else multilingual for lang in batch.languages]
        for model in [english] if multilingual is english else [english, multilingual]:
            idx = [i for i, m in enumerate(chosen) if m is model and not batch.errors[i]]
            if not idx:
                continue
            img = model.encode_images(batch.images[idx])
            txt = model.encode_texts([batch.captions[i] for i in idx])
            sims[idx] = (img * txt).sum(axis=1)
        for i, key in enumerate(batch.keys):
            model = chosen[i]
            ok = not batch.errors[i]
            keep = bool(ok and sims[i] >= model.spec.threshold)
            rows.append({"key": key, "url": batch.urls[i], "caption": batch.captions[i],
                         "language": batch.languages[i], "model": model.spec.name,
                         "similarity": float(sims[i]) if ok else None, "threshold": model.spec.threshold,
                         "keep": keep, "status": "scored" if ok else "failed_to_decode",
                         "error_message": batch.errors[i] or None})
            report.samples += 1
            report.failed += not ok
            report.kept += keep
            report.by_model[model.spec.name] = report.by_model.get(model.spec.name, 0) + 1
        if log:
            log(f"scored {report.samples} samples ({report.kept} kept)")
    rows.sort(key=lambda r: r["key"])
    report.seconds = time.perf_counter() - start
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), report


def refilter(scores: pa.Table, thresholds: dict[str, float]) -> pa.Table:
    """New keep flags from stored similarities (model name -> threshold), without recomputing anything."""
    models = scores["model"].to_pylist()
    sims = scores["similarity"].to_pylist()
    new_t = [thresholds.get(m, t) for m, t in zip(models, scores["threshold"].to_pylist(), strict=True)]
    keep = [s is not None and s >= t for s, t in zip(sims, new_t, strict=True)]
    scores = scores.set_column(scores.schema.get_field_index("threshold"), "threshold",
                               pa.array(new_t, pa.float32()))
    return scores.set_column(scores.schema.get_field_index("keep"), "keep", pa.array(keep))


# --- embeddings ------------------------------------------------------------------------------------

EMBED_META_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                               ("language", pa.string())])


def embed_shards(tar_paths: list[str], keep: frozenset[str], model: LoadedClip, batch_size: int = 256,
                 workers: int = 1, log: Log | None = None) -> tuple[np.ndarray, np.ndarray, pa.Table, StageReport]:
    """L2-normalized image and text embeddings (float16) of the kept samples, row-aligned with metadata
    sorted by key; a sample whose image fails to decode here is left out and counted."""
    start = time.perf_counter()
    report = StageReport()
    keys: list[str] = []
    meta: list[dict[str, str]] = []
    img_parts: list[np.ndarray] = []
    txt_parts: list[np.ndarray] = []
    pin = model.device.type == "cuda"
    for batch in decoded_batches(tar_paths, model.preprocess, model.image_size, batch_size, workers, keep, pin):
        idx = [i for i, e in enumerate(batch.errors) if not e]
        report.samples += len(batch.keys)
        report.failed += len(batch.keys) - len(idx)
        if not idx:
            continue
        img_parts.append(model.encode_images(batch.images[idx]).astype(np.float16))
        txt_parts.append(model.encode_texts([batch.captions[i] for i in idx]).astype(np.float16))
        for i in idx:
            keys.append(batch.keys[i])
            meta.append({"key": batch.keys[i], "url": batch.urls[i], "caption": batch.captions[i],
                         "language": batch.languages[i]})
        if log:
            log(f"embedded {len(keys)} samples")
    dim = model.model.visual.output_dim
    img = np.concatenate(img_parts) if img_parts else np.zeros((0, dim), np.float16)
    txt = np.concatenate(txt_parts) if txt_parts else np.zeros((0, dim), np.float16)
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, dtype=np.int64)
    report.kept = len(keys)
    report.by_model = {model.spec.name: len(keys)}
    report.seconds = time.perf_counter() - start
    table = pa.Table.from_pylist([meta[i] for i in order], schema=EMBED_META_SCHEMA)
    return img[order], txt[order], table, report


# --- the small offline CLIP ------------------------------------------------------------------------

def synthetic_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A rendered scene as the download stage stores it (padded square) and CLIP preprocessing sees it."""
    from laion_assets.core.resize import pad_square

    arr = np.asarray(pad_square(img).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def synthetic_pairs(n: int, seed: int, size: int, languages: tuple[str, ...], watermark_rate: float = 0.0
                    ) -> tuple[torch.Tensor, list[Any], list[str]]:
    """n rendered scenes (small renders: cheap, and the model sees 32 px anyway), their scenes and captions."""
    from laion_assets.core.synthetic import random_scene, render

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
    from laion_assets.core.resize import process_image
    from laion_assets.core.settings import ResizeSettings
    from laion_assets.core.synthetic import jpeg_bytes, random_scene, render

    rng = random.Random(seed)
    tensors, captions = [], []
    for i in range(n):
        scene = random_scene(rng)
        size = (rng.randint(320, 640), rng.randint(240, 480))
        stored = process_image(jpeg_bytes(render(scene, size, seed=seed * 1_000_003 + i)), ResizeSettings()).data
        with Image.open(io.BytesIO(stored)) as img:
            tensors.append(model.preprocess(img.convert("RGB")))
        captions.append(scene.caption(rng.choice(languages)))
    img = model.encode_images(torch.stack(tensors))
    shuffled = captions[1:] + captions[:1]
    return (img * model.encode_texts(captions)).sum(1), (img * model.encode_texts(shuffled)).sum(1)


def save_clip(model: Any, spec: ClipSpec, card: dict[str, Any]) -> None:
    path = Path(spec.pretrained)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    Path(str(path) + ".json").write_text(json.dumps(
        {"name": spec.name, "arch": spec.arch, "threshold": spec.threshold, **card}, indent=2))
