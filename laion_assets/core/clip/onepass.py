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

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from laion_assets.core.clip.loader import (
    Batch,
    TextPlan,
    View,
    batches,
    every_language,
    is_english,
    not_english,
    split_transform,
)
from laion_assets.core.clip.models import LoadedClip
from laion_assets.core.clip.preprocess import device_views
from laion_assets.core.clip.specs import WatermarkSpec
from laion_assets.core.clip.watermark import pwatermark, watermark_transform
from laion_assets.core.progress import Log

PATHS = ("pil", "device")


def decode_path(settings: Any, device_type: str) -> str:
    """ModelSettings.decode as a path: `pil` (CPU workers decode) or `device`; auto: device on CUDA."""
    return ("device" if device_type == "cuda" else "pil") if settings.decode == "auto" else settings.decode


def clip_view(model: LoadedClip) -> View:
    return split_transform(model.preprocess, model.image_size)


def watermark_view(spec: WatermarkSpec) -> View:
    return split_transform(watermark_transform(spec.image_size, spec.interpolation), spec.image_size)


def normalize(pixels: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32, scaled and normalized: ToTensor's and Normalize's arithmetic, in their order,
    so the values equal torchvision's preprocessing of the same pixels."""
    mean = torch.tensor(view.mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(view.std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    out = pixels.to(torch.float32).div(255).sub(mean).div(std)
    # The pixels arrive channels-last; CPU convolutions round differently on that layout, and the CPU path's
    # results must equal those of the models' own preprocessing. CUDA models run channels-last anyway.
    return out.contiguous() if out.device.type == "cpu" else out


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
            out["en"] = TextPlan(self.english.tokenizer, every_language if same else is_english)
            if not same:
                out["multi"] = TextPlan(self.multilingual.tokenizer, not_english)
        if self.embed is not None:
            out["embed"] = TextPlan(self.embed.tokenizer, every_language)
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
    chosen = [models.english if is_english(lang) else models.multilingual for lang in batch.languages]
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
        spec = models.watermark_spec
        assert spec is not None
        px, pending.mark_px = _take(pending.mark_px, n)
        scores = np.full(n, np.nan, np.float32)
        if ok:
            sel = torch.as_tensor(ok, device=px.device)
            scores[ok] = pwatermark(models.watermark, normalize(px[sel], views["watermark"]), px.device,
                                    spec.watermark_index)
        for i, key in enumerate(keys):
            good = not errors[i]
            result.watermark_rows.append({
                "key": key, "model": spec.name, "pwatermark": float(scores[i]) if good else None,
                "watermark": bool(good and scores[i] > spec.threshold),
                "status": "scored" if good else "failed_to_decode", "error_message": errors[i] or None})
