"""One pass over a bucket's shards for everything that needs pixels: the English and multilingual CLIP's
similarity of every sample, then the embedding CLIP's image and text embeddings and the watermark classifier's
pwatermark of the kept ones, each shard read once and each image decoded once.

Each model sees the image through its own view (open_clip's resize and centre crop, the watermark classifier's
squash to a square). On the `pil` path a DataLoader worker decodes the JPEG once, applies every view's resize in
PIL and hands over uint8 pixels; the model's device scales and normalizes them, the same arithmetic as
torchvision's ToTensor and Normalize, so the values equal those of the models' own preprocessing. On the `device`
path (`preprocess.py`) the worker only reads the JPEG bytes and the device decodes (nvJPEG on CUDA), resizes and
normalizes. Workers also tokenize the captions, one call per tokenizer and batch.

The kept samples are gathered across scoring batches and embedded in batches of `batch_size`, so the large model
runs on full batches (the same batches as a pass over the kept samples alone).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from laion_assets.core.clip.models import LoadedClip, Log
from laion_assets.core.clip.shards import iter_shard_samples
from laion_assets.core.clip.specs import WatermarkSpec

PATHS = ("pil", "device")


def decode_path(settings: Any, device_type: str) -> str:
    """ModelSettings.decode as a path: `pil` (CPU workers decode) or `device`; auto: device on CUDA."""
    return ("device" if device_type == "cuda" else "pil") if settings.decode == "auto" else settings.decode


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
    return View(repr(pil), T.Compose(pil), size, tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std),
                crop)


def clip_view(model: LoadedClip) -> View:
    return split_transform(model.preprocess, model.image_size)


def watermark_view(spec: WatermarkSpec) -> View:
    from laion_assets.core.clip.watermark import watermark_transform

    return split_transform(watermark_transform(spec.image_size), spec.image_size)


def normalize(pixels: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32, scaled and normalized: ToTensor's and Normalize's arithmetic, in their order,
    so the values equal torchvision's preprocessing of the same pixels."""
    mean = torch.tensor(view.mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(view.std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    out = pixels.to(torch.float32).div(255).sub(mean).div(std)
    # The pixels arrive channels-last; CPU convolutions round differently on that layout, and the CPU path's
    # results must equal those of the models' own preprocessing. CUDA models run channels-last anyway.
    return out.contiguous() if out.device.type == "cpu" else out


# --- tokenizing in the workers ------------------------------------------------------------------------------------
def _english(language: str) -> bool:
    return language == "en"


def _other(language: str) -> bool:
    return language != "en"


def _every(_language: str) -> bool:
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


# --- the pass -----------------------------------------------------------------------------------------------------
@dataclass
class Models:
    """What the pass computes: similarity (english and multilingual), embeddings, pwatermark; None: not wanted."""

    english: LoadedClip | None = None
    multilingual: LoadedClip | None = None
    embed: LoadedClip | None = None
    watermark: Any = None  # the classifier (nn.Module)
    watermark_spec: WatermarkSpec | None = None

    @property
    def scoring(self) -> bool:
        return self.english is not None

    def device(self) -> torch.device:
        for m in (self.english, self.embed):
            if m is not None:
                return m.device
        return next(self.watermark.parameters()).device

    def scorers(self) -> list[LoadedClip]:
        assert self.english is not None and self.multilingual is not None
        return [self.english] if self.multilingual is self.english else [self.english, self.multilingual]

    def views(self) -> dict[str, View]:
        """Which view each model input uses: 'score', 'embed', 'watermark'."""
        out = {}
        if self.english is not None:
            out["score"] = clip_view(self.english)
        if self.embed is not None:
            out["embed"] = clip_view(self.embed)
        if self.watermark is not None:
            assert self.watermark_spec is not None
            out["watermark"] = watermark_view(self.watermark_spec)
        return out

    def texts(self) -> dict[str, TextPlan]:
        out = {}
        if self.english is not None:
            assert self.multilingual is not None
            same = self.multilingual is self.english
            out["en"] = TextPlan(self.english.tokenizer, _every if same else _english)
            if not same:
                out["multi"] = TextPlan(self.multilingual.tokenizer, _other)
        if self.embed is not None:
            out["embed"] = TextPlan(self.embed.tokenizer, _every)
        return out


@dataclass
class StageReport:
    samples: int = 0
    failed: int = 0
    kept: int = 0
    seconds: float = 0.0
    by_model: dict[str, int] = field(default_factory=dict)
    refiltered_only: bool = False

    def metadata(self) -> dict[str, Any]:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return {"samples": self.samples, "failed_to_decode": self.failed, "kept": self.kept,
                "kept_fraction": round(self.kept / self.samples, 4) if self.samples else 0.0,
                "seconds": round(self.seconds, 2), "images_per_s": round(rate, 1), "by_model": self.by_model,
                "refiltered_only": self.refiltered_only}


@dataclass
class PassResult:
    """What one pass computed: score rows, embeddings (image, text, metadata rows) and watermark rows, with
    their reports; a part not computed stays empty."""

    score_rows: list[dict[str, Any]] = field(default_factory=list)
    score_report: StageReport = field(default_factory=StageReport)
    embed_keys: list[str] = field(default_factory=list)
    embed_meta: list[dict[str, str]] = field(default_factory=list)
    img_parts: list[np.ndarray] = field(default_factory=list)
    txt_parts: list[np.ndarray] = field(default_factory=list)
    embed_report: StageReport = field(default_factory=StageReport)
    watermark_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class Pixels:
    """A batch's pixels as each model wants them, on the model's device."""

    def __init__(self, batch: Batch, views: dict[str, View], device: torch.device, path: str) -> None:
        self.views, self.device = views, device
        if path == "device":
            from laion_assets.core.clip.preprocess import device_views

            self.uint8 = device_views(batch, list(views.values()), device)  # also records decode errors
        else:
            unique = {v.key for v in views.values()}
            self.uint8 = {k: batch.pixels[k].to(device, non_blocking=True).permute(0, 3, 1, 2) for k in unique}

    def raw(self, name: str, rows: list[int]) -> torch.Tensor:
        """uint8 (len(rows), 3, S, S) of the view `name`."""
        x = self.uint8[self.views[name].key]
        return x[torch.as_tensor(rows, device=x.device)] if len(rows) != x.shape[0] else x


def _tokens(batch: Batch, plan: str, rows: list[int]) -> torch.Tensor:
    where = {r: i for i, r in enumerate(batch.token_rows[plan])}
    return batch.tokens[plan][[where[r] for r in rows]]


@dataclass
class _Kept:
    """Kept samples waiting for a full batch of the embedding model and the watermark classifier."""

    keys: list[str] = field(default_factory=list)
    meta: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    embed_px: list[torch.Tensor] = field(default_factory=list)
    embed_tokens: list[torch.Tensor] = field(default_factory=list)
    mark_px: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def one_pass(tar_paths: list[str], models: Models, keep: frozenset[str] | None = None, batch_size: int = 256,
             workers: int = 1, path: str = "pil", log: Log | None = None) -> PassResult:
    """Similarity of every sample (when scoring), then embeddings and pwatermark of the kept ones: those the
    scores keep, or `keep` when not scoring (then only those are read)."""
    if path not in PATHS:
        raise ValueError(f"decode path must be one of {PATHS}, not {path!r}")
    if models.scoring:
        assert models.english is not None and models.multilingual is not None
        if models.english.image_size != models.multilingual.image_size:
            raise ValueError(f"the English and multilingual CLIPs must share an input size "
                             f"({models.english.image_size} vs {models.multilingual.image_size})")
        keep = None
    elif keep is None:
        raise ValueError("without scoring, the pass needs the kept keys")
    start = time.perf_counter()
    device = models.device()
    views = models.views()
    result = PassResult()
    pending = _Kept()
    for batch in batches(tar_paths, list(views.values()), models.texts(), batch_size, workers, keep,
                         raw=path == "device", pin=device.type == "cuda"):
        pixels = Pixels(batch, views, device, path)
        kept = _score(batch, pixels, models, result) if models.scoring else list(range(len(batch.keys)))
        if models.embed is not None or models.watermark is not None:
            _gather(batch, pixels, kept, models, pending)
        while len(pending) >= batch_size:
            _flush(pending, batch_size, models, views, result)
        if log:
            log(f"{'scored' if models.scoring else 'read'} {result.score_report.samples or result.embed_report.samples}"
                f" samples, {len(result.embed_keys) + len(result.watermark_rows)} embedded or watermark-scored")
    while len(pending):
        _flush(pending, batch_size, models, views, result)
    result.seconds = time.perf_counter() - start
    return result


def _score(batch: Batch, pixels: Pixels, models: Models, result: PassResult) -> list[int]:
    """The batch's similarity rows; the rows kept."""
    from laion_assets.core.clip.specs import weights_id

    assert models.english is not None and models.multilingual is not None
    report = result.score_report
    sims = np.full(len(batch.keys), np.nan, dtype=np.float32)
    chosen = [models.english if _english(lang) else models.multilingual for lang in batch.languages]
    plans = {id(models.english): "en"}
    plans.setdefault(id(models.multilingual), "multi")
    weights = {id(m): weights_id(m.spec.arch, m.spec.pretrained) for m in models.scorers()}
    for model in models.scorers():
        idx = [i for i, m in enumerate(chosen) if m is model and not batch.errors[i]]
        if not idx:
            continue
        img = model.encode_pixels(normalize(pixels.raw("score", idx), pixels.views["score"]))
        txt = model.encode_tokens(_tokens(batch, plans[id(model)], idx))
        sims[idx] = (img * txt).sum(axis=1)
    kept = []
    for i, key in enumerate(batch.keys):
        model = chosen[i]
        ok = not batch.errors[i]
        keep = bool(ok and sims[i] >= model.spec.threshold)
        result.score_rows.append({
            "key": key, "url": batch.urls[i], "caption": batch.captions[i], "language": batch.languages[i],
            "sha256": batch.sha256s[i], "model": model.spec.name,
            "weights": weights[id(model)],
            "similarity": float(sims[i]) if ok else None, "threshold": model.spec.threshold, "keep": keep,
            "status": "scored" if ok else "failed_to_decode", "error_message": batch.errors[i] or None})
        report.samples += 1
        report.failed += not ok
        report.kept += keep
        report.by_model[model.spec.name] = report.by_model.get(model.spec.name, 0) + 1
        if keep:
            kept.append(i)
    return kept


def _gather(batch: Batch, pixels: Pixels, rows: list[int], models: Models, pending: _Kept) -> None:
    if not rows:
        return
    pending.keys += [batch.keys[i] for i in rows]
    pending.errors += [batch.errors[i] for i in rows]
    pending.meta += [{"key": batch.keys[i], "url": batch.urls[i], "caption": batch.captions[i],
                      "language": batch.languages[i]} for i in rows]
    if models.embed is not None:
        pending.embed_px.append(pixels.raw("embed", rows))
        pending.embed_tokens.append(_tokens(batch, "embed", rows))
    if models.watermark is not None:
        pending.mark_px.append(pixels.raw("watermark", rows))


def _take(parts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first n rows of the concatenated parts, and the rest as one part."""
    whole = torch.cat(parts) if len(parts) > 1 else parts[0]
    return whole[:n], [whole[n:]] if whole.shape[0] > n else []


def _flush(pending: _Kept, batch_size: int, models: Models, views: dict[str, View], result: PassResult) -> None:
    """Embeds and watermark-scores the first `batch_size` pending samples."""
    n = min(batch_size, len(pending))
    keys, meta, errors = pending.keys[:n], pending.meta[:n], pending.errors[:n]
    del pending.keys[:n], pending.meta[:n], pending.errors[:n]
    ok = [i for i, e in enumerate(errors) if not e]
    if models.embed is not None:
        px, pending.embed_px = _take(pending.embed_px, n)
        tokens, pending.embed_tokens = _take(pending.embed_tokens, n)
        report = result.embed_report
        report.samples += n
        report.failed += n - len(ok)
        if ok:
            view = views["embed"]
            sel = torch.as_tensor(ok, device=px.device)
            result.img_parts.append(models.embed.encode_pixels(normalize(px[sel], view)).astype(np.float16))
            result.txt_parts.append(models.embed.encode_tokens(tokens[ok]).astype(np.float16))
            result.embed_keys += [keys[i] for i in ok]
            result.embed_meta += [meta[i] for i in ok]
    if models.watermark is not None:
        from laion_assets.core.clip.watermark import pwatermark

        spec = models.watermark_spec
        assert spec is not None
        px, pending.mark_px = _take(pending.mark_px, n)
        scores = np.full(n, np.nan, np.float32)
        if ok:
            sel = torch.as_tensor(ok, device=px.device)
            scores[ok] = pwatermark(models.watermark, normalize(px[sel], views["watermark"]), px.device)
        for i, key in enumerate(keys):
            good = not errors[i]
            result.watermark_rows.append({
                "key": key, "model": spec.name, "pwatermark": float(scores[i]) if good else None,
                "watermark": bool(good and scores[i] > spec.threshold),
                "status": "scored" if good else "failed_to_decode", "error_message": errors[i] or None})
