"""CLIP image-caption similarity of every downloaded sample, the threshold of the model that scored it, and keep.

English captions are scored by the English CLIP, all others (other languages and nolang) by the multilingual one;
each row records the model's name and the identity of its weights. A rescore is skipped when the stored rows
were made by the same weights from the same image bytes: then only the (possibly changed) thresholds are
re-applied to the stored similarities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from laion_assets.core.clip.models import ClipSpec, LoadedClip, Log, load_clip, weights_id
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.shards import decoded_batches, downloaded_samples
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.settings import ModelSettings
from laion_assets.core.storage import Storage

SCORE_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("language", pa.string()),
    ("sha256", pa.string()), ("model", pa.string()), ("weights", pa.string()), ("similarity", pa.float32()),
    ("threshold", pa.float32()), ("keep", pa.bool_()), ("status", pa.string()), ("error_message", pa.string()),
])


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


def is_english(language: str) -> bool:
    return language == "en"


def spec_weights(spec: ClipSpec) -> str:
    return weights_id(spec.arch, spec.pretrained)


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
    weights = {id(english): spec_weights(english.spec), id(multilingual): spec_weights(multilingual.spec)}
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
                         "language": batch.languages[i], "sha256": batch.sha256s[i], "model": model.spec.name,
                         "weights": weights[id(model)], "similarity": float(sims[i]) if ok else None,
                         "threshold": model.spec.threshold, "keep": keep,
                         "status": "scored" if ok else "failed_to_decode", "error_message": batch.errors[i] or None})
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
    """New keep flags from stored similarities (weights id -> threshold), without recomputing anything."""
    sims = scores["similarity"].to_pylist()
    new_t = [thresholds.get(w, t) for w, t in zip(scores["weights"].to_pylist(), scores["threshold"].to_pylist(),
                                                   strict=True)]
    keep = [s is not None and s >= t for s, t in zip(sims, new_t, strict=True)]
    scores = scores.set_column(scores.schema.get_field_index("threshold"), "threshold", pa.array(new_t, pa.float32()))
    return scores.set_column(scores.schema.get_field_index("keep"), "keep", pa.array(keep))


def can_reuse(previous: pa.Table, current: pa.Table, chosen: ModelSet) -> bool:
    """Whether stored scores still hold: the same samples (key) with the same image bytes (sha256) and language,
    each scored by the weights that would score it now. Random weights never match."""
    if previous.schema.names != SCORE_SCHEMA.names or previous.num_rows != current.num_rows:
        return False
    en, multi = spec_weights(chosen.clip_en), spec_weights(chosen.clip_multi)
    if not en or not multi:
        return False
    if not previous.select(["key", "sha256", "language"]).equals(current.select(["key", "sha256", "language"])):
        return False
    wanted = [en if is_english(lang) else multi for lang in current["language"].to_pylist()]
    return previous["weights"].to_pylist() == wanted


def kept_keys(scores: pa.Table) -> frozenset[str]:
    return frozenset(k for k, kept in zip(scores["key"].to_pylist(), scores["keep"].to_pylist(), strict=True) if kept)


def score_bucket(store: Storage, download: ShardsManifest, chosen: ModelSet, settings: ModelSettings,
                 previous: pa.Table | None = None, reuse: bool = True, log: Log | None = None
                 ) -> tuple[pa.Table, StageReport]:
    """Scores of a finished download's samples: re-filtered from `previous` when it still holds, else computed."""
    from laion_assets.core.clip.models import pick_device

    start = time.perf_counter()
    shards = download.keys()
    if reuse and previous is not None and can_reuse(previous, downloaded_samples(store, shards), chosen):
        table = refilter(previous, {spec_weights(s): s.threshold for s in (chosen.clip_en, chosen.clip_multi)})
        keep = table["keep"].to_pylist()
        report = StageReport(samples=table.num_rows, kept=sum(keep), refiltered_only=True,
                             failed=table["status"].to_pylist().count("failed_to_decode"),
                             seconds=time.perf_counter() - start)
        if log:
            log(f"re-filtered {table.num_rows} stored similarities: {report.kept} kept")
        return table, report
    device = pick_device(settings.device)
    english = load_clip(chosen.clip_en, device)
    multilingual = english if chosen.clip_multi == chosen.clip_en else load_clip(chosen.clip_multi, device)
    with store.local_copies([s.tar for s in shards]) as local:
        return score_shards(local, english, multilingual, settings.batch_size, settings.decode_workers, log)


def similarity_histogram(scores: pa.Table, bins: int = 10) -> dict[str, int]:
    sims = np.array([s for s in scores["similarity"].to_pylist() if s is not None], dtype=np.float32)
    if not len(sims):
        return {}
    counts, edges = np.histogram(sims, bins=bins)
    return {f"{e:.2f}": int(c) for e, c in zip(edges[:-1], counts, strict=True)}
