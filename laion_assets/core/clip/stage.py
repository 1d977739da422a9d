"""The pixel work of the CLIP stage for one bucket, in one pass: what `clip_scores`, `image_embeddings` and
`watermark_scores` need, for whichever of them a run asks.

Scores are re-filtered from the stored ones when those still hold (`scores.reused_scores`); otherwise every
sample is scored. The kept samples (of the new scores, or of the stored ones when the scores are not asked for)
are embedded and watermark-scored in the same pass, reading each shard once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from laion_assets.core.clip import scores
from laion_assets.core.clip.models import Log, load_clip, pick_device
from laion_assets.core.clip.onepass import Models, StageReport, decode_path, one_pass
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.settings import ModelSettings
from laion_assets.core.storage import Storage

OUTPUTS = ("clip_scores", "image_embeddings", "watermark_scores")


class MissingScoresError(RuntimeError):
    """Embeddings or watermark scores were asked for a bucket whose clip_scores are not stored."""


@dataclass
class BucketOutputs:
    """What the pass made; None for an output not asked for."""

    scores: pa.Table | None = None
    score_report: StageReport | None = None
    embeddings: tuple[np.ndarray, np.ndarray, pa.Table, StageReport] | None = None
    watermark: tuple[pa.Table, dict[str, Any]] | None = None
    kept: frozenset[str] = frozenset()
    decode_path: str = ""


def clip_bucket(store: Storage, download: ShardsManifest, chosen: ModelSet, settings: ModelSettings,
                want: frozenset[str] | set[str], stored_scores: pa.Table | None, reuse: bool = True,
                log: Log | None = None) -> BucketOutputs:
    """The outputs in `want` (names of OUTPUTS) for a finished download, in at most one pass over its shards.
    `stored_scores` is this bucket's clip_scores as stored (None when there are none)."""
    unknown = set(want) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"not outputs of the CLIP pass: {sorted(unknown)}")
    out = BucketOutputs()
    if "clip_scores" in want:
        reused = scores.reused_scores(store, download, chosen, stored_scores, reuse, log)
        if reused is not None:
            out.scores, out.score_report = reused
    elif stored_scores is None:
        raise MissingScoresError("this bucket's clip_scores are not stored: materialize clip_scores first")
    rescore = "clip_scores" in want and out.scores is None
    embed, mark = "image_embeddings" in want, "watermark_scores" in want
    if not (rescore or embed or mark):
        return out
    from laion_assets.core.clip.embeddings import embedding_arrays
    from laion_assets.core.clip.watermark import load_watermark, watermark_table

    device = pick_device(settings.device)
    models = Models()
    if rescore:
        models.english, models.multilingual = scores.load_scorers(chosen, device)
    if embed:
        models.embed = load_clip(chosen.embed, device, settings.embed_precision)
    if mark:
        models.watermark, models.watermark_spec = load_watermark(chosen.watermark, device), chosen.watermark
    keep = None if rescore else scores.kept_keys(out.scores if out.scores is not None else stored_scores)
    out.decode_path = decode_path(settings, device.type)
    with store.local_copies([s.tar for s in download.keys()]) as local:
        result = one_pass(local, models, keep, settings.batch_size, settings.decode_workers, out.decode_path, log)
    if rescore:
        out.scores = scores.score_table(result)
        out.score_report = result.score_report
    assert out.scores is not None or stored_scores is not None
    out.kept = scores.kept_keys(out.scores if out.scores is not None else stored_scores)
    if embed:
        assert models.embed is not None
        img, txt, meta, report = embedding_arrays(result, models.embed)
        meta = meta.append_column("model", pa.array([chosen.embed.name] * meta.num_rows, pa.string()))
        out.embeddings = img, txt, meta, report
    if mark:
        out.watermark = watermark_table(result)
    return out
