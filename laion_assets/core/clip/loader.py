"""Reading a bucket's shards for the CLIP pass: a DataLoader whose workers read each sample once, decode its image
once into every model's view (the `pil` path) or keep its bytes for the device to decode (the `device` path), and
tokenize its caption for every text model that reads it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from laion_assets.core.clip.shards import iter_shard_samples


@dataclass(frozen=True)
class View:
    """How one model sees an image: `resize` (PIL image -> PIL image of size x size) runs where the image is
    decoded; scaling to [0, 1] and normalizing by mean and std run on the model's device."""

    key: str  # views with the same resize share their pixels
    resize: Any
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: bool  # resize the short side and centre-crop (CLIP), else squash to a square (watermark)
    interpolation: str = "bicubic"  # of the resize (LAION's watermark model: bilinear)


def split_transform(transform: Any, size: int) -> View:
    """A torchvision Compose of PIL steps, ToTensor and Normalize (what open_clip and the watermark classifier
    use) as a View: the PIL steps, and the Normalize's mean and std."""
    from torchvision import transforms as T

    steps = list(transform.transforms)
    names = [type(s).__name__ for s in steps]
    to_tensor = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
    if to_tensor is None or names[to_tensor + 1:] != ["Normalize"]:
        raise ValueError(f"cannot split {transform}: expected PIL steps, ToTensor and Normalize")
    pil = [s for s in steps[:to_tensor] if type(s).__name__ not in ("MaybeConvertMode",)]
    norm = steps[-1]
    crop = any(isinstance(s, T.CenterCrop) for s in pil)
    resize = next((s for s in pil if isinstance(s, T.Resize)), None)
    interpolation = resize.interpolation.value if resize is not None else "bicubic"
    return View(repr(pil), T.Compose(pil), size, tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std),
                crop, interpolation)


# --- tokenizing in the workers ------------------------------------------------------------------------------------
def is_english(language: str) -> bool:
    """English captions go to the English CLIP, every other one (other languages and nolang) to the multilingual."""
    return language == "en"


def not_english(language: str) -> bool:
    return language != "en"


def every_language(_language: str) -> bool:
    return True


@dataclass(frozen=True)
class TextPlan:
    """A tokenizer and the rows it tokenizes (by the caption's language)."""

    tokenizer: Any
    rows: Callable[[str], bool]


# --- the loader ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    keys: list[str]
    errors: list[str]
    captions: list[str]
    languages: list[str]
    urls: list[str]
    sha256s: list[str]
    pixels: dict[str, torch.Tensor]  # view key -> uint8 (N, S, S, 3) (pil path)
    jpegs: torch.Tensor | None  # the image bytes, concatenated (device path)
    offsets: list[int]  # where each sample's bytes start in `jpegs` (and the end)
    tokens: dict[str, torch.Tensor]  # plan name -> tokens of its rows
    token_rows: dict[str, list[int]]

    def pin_memory(self) -> Batch:
        """The uint8 buffers in page-locked memory (DataLoader's pin_memory calls this), so copies to the GPU
        are asynchronous and run at full bus speed."""
        self.pixels = {k: v.pin_memory() for k, v in self.pixels.items()}
        if self.jpegs is not None:
            self.jpegs = self.jpegs.pin_memory()
        return self

    def image_bytes(self, i: int) -> torch.Tensor:
        assert self.jpegs is not None
        return self.jpegs[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class _Item:
    key: str
    error: str
    caption: str
    language: str
    url: str
    sha256: str
    pixels: dict[str, np.ndarray]
    data: bytes


def decode_views(data: bytes, views: list[View]) -> tuple[dict[str, np.ndarray], str]:
    """One decode of an image and its pixels in every view (uint8 HWC); zeros and the error when it fails."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
            return {v.key: np.asarray(v.resize(rgb), dtype=np.uint8) for v in views}, ""
    except Exception as err:  # noqa: BLE001 - one bad image is one failed row
        return ({v.key: np.zeros((v.size, v.size, 3), np.uint8) for v in views},
                f"cannot decode image: {type(err).__name__}: {err}")


class _Samples(torch.utils.data.IterableDataset):
    """The shards' samples, decoded to every view (pil) or as bytes (device); workers take every n-th shard."""

    def __init__(self, tar_paths: list[str], views: list[View], keep: frozenset[str] | None, raw: bool) -> None:
        self.tar_paths, self.views, self.keep, self.raw = tar_paths, views, keep, raw

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        paths = self.tar_paths if info is None else self.tar_paths[info.id::info.num_workers]
        for path in paths:
            for s in iter_shard_samples(path, self.keep):
                pixels, error = ({}, "") if self.raw else decode_views(s.image, self.views)
                meta = s.meta
                yield _Item(s.key, error, s.caption, str(meta.get("language") or ""), str(meta.get("url") or ""),
                            str(meta.get("sha256") or ""), pixels, s.image if self.raw else b"")


class _Collate:
    """One tensor per view (or one byte buffer) for the batch, and the captions tokenized by each plan; runs in
    the worker."""

    def __init__(self, views: list[View], texts: dict[str, TextPlan], raw: bool) -> None:
        self.views, self.texts, self.raw = views, texts, raw

    def __call__(self, items: list[_Item]) -> Batch:
        pixels = {} if self.raw else {v.key: torch.from_numpy(np.stack([it.pixels[v.key] for it in items]))
                                      for v in self.views}
        jpegs, offsets = None, [0]
        if self.raw:
            for it in items:
                offsets.append(offsets[-1] + len(it.data))
            jpegs = torch.frombuffer(bytearray(b"".join(it.data for it in items)) or bytearray(1), dtype=torch.uint8)
        tokens, token_rows = {}, {}
        for name, plan in self.texts.items():
            rows = [i for i, it in enumerate(items) if plan.rows(it.language)]
            token_rows[name] = rows
            if rows:
                tokens[name] = plan.tokenizer([items[i].caption for i in rows])
        return Batch([it.key for it in items], [it.error for it in items], [it.caption for it in items],
                     [it.language for it in items], [it.url for it in items], [it.sha256 for it in items], pixels,
                     jpegs, offsets, tokens, token_rows)


def _one_thread(_worker_id: int) -> None:
    # A decode worker needs one thread; torch's default (all cores) would fight the model for them.
    torch.set_num_threads(1)


def batches(tar_paths: list[str], views: list[View], texts: dict[str, TextPlan], batch_size: int, workers: int,
            keep: frozenset[str] | None = None, raw: bool = False, pin: bool = False) -> Iterator[Batch]:
    """The samples of the shards in batches, each image decoded once into every view (or left as bytes)."""
    unique = list({v.key: v for v in views}.values())
    workers = max(0, min(workers, len(tar_paths)))
    loader = torch.utils.data.DataLoader(
        _Samples(sorted(tar_paths), unique, keep, raw), batch_size=batch_size, num_workers=workers,
        collate_fn=_Collate(unique, texts, raw), pin_memory=pin, prefetch_factor=4 if workers else None,
        persistent_workers=False, worker_init_fn=_one_thread)
    yield from loader
