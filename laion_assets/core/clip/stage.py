"""The CLIP stage's entry point for one bucket: `run` computes whichever parts are asked for (the similarity scores,
the embeddings, the watermark scores) in at most one pass over the bucket's shards. The `clip_pass` asset and the
`laion-assets clip` commands both call it.

Scores are re-filtered from the stored ones when those still hold (`scores.reused_scores`); otherwise every sample
is scored. The kept samples (of the new scores, or of the stored ones when the scores are not asked for) are
embedded and watermark-scored in the same pass, reading each shard once. Embeddings are written where the caller
says (they are bulk files); the two tables are returned.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from laion_assets.core.clip import scores
from laion_assets.core.clip.embeddings import embedding_arrays, read_embeddings, write_embeddings
from laion_assets.core.clip.manifests import EmbeddingsManifest
from laion_assets.core.clip.models import load_clip, pick_device
from laion_assets.core.clip.onepass import Models, StageReport, decode_path, one_pass
from laion_assets.core.clip.parts import Part
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.watermark import load_watermark_model, watermark_table
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.paths import EmbeddingKeys
from laion_assets.core.progress import Log
from laion_assets.core.settings import ModelSettings
from laion_assets.core.storage import Storage


class MissingScoresError(RuntimeError):
    """Embeddings or watermark scores were asked for a bucket whose scores are not stored."""


@dataclass
class ClipReport:
    """What the pass made; None for a part not asked for. `stored_rows` is the embeddings' metadata rows as read
    back (the three files checked to belong together)."""

    scores: pa.Table | None = None
    score_report: StageReport | None = None
    embeddings: EmbeddingsManifest | None = None
    embed_report: StageReport | None = None
    stored_rows: int = 0
    watermark: pa.Table | None = None
    watermark_report: dict[str, Any] | None = None
    kept: frozenset[str] = frozenset()
    decode_path: str = ""


def run(store: Storage, download: ShardsManifest, chosen: ModelSet, settings: ModelSettings,
        parts: Collection[Part], stored_scores: pa.Table | None = None,
        embeddings_at: tuple[Storage, EmbeddingKeys] | None = None, reuse: bool = True,
        log: Log | None = None) -> ClipReport:
    """The parts asked for, for a finished download (in `store`), in at most one pass over its shards.
    `stored_scores` is this bucket's scores as stored (None when there are none): re-filtered when the scores are
    asked for and still hold, the kept samples otherwise; `embeddings_at` is where the embeddings go."""
    parts = {Part(p) for p in parts}
    if Part.EMBEDDINGS in parts and embeddings_at is None:
        raise ValueError("embeddings asked for without a place to write them (embeddings_at)")
    out = ClipReport()
    if Part.SCORES in parts:
        reused = scores.reused_scores(store, download, chosen, stored_scores, reuse, log)
        if reused is not None:
            out.scores, out.score_report = reused
    elif stored_scores is None:
        raise MissingScoresError("this bucket's scores are not stored: compute the scores first")
    rescore = Part.SCORES in parts and out.scores is None
    embed, mark = Part.EMBEDDINGS in parts, Part.WATERMARK in parts
    embedded = (_pass(store, download, chosen, settings, out, rescore, embed, mark, stored_scores, log)
                if rescore or embed or mark else None)
    out.kept = scores.kept_keys(out.scores if out.scores is not None else stored_scores)
    if embedded is not None:
        assert embeddings_at is not None
        target, keys = embeddings_at
        out.embeddings = write_embeddings(target, keys, *embedded)
        out.stored_rows = read_embeddings(target, keys)[2].num_rows
    return out


def _pass(store: Storage, download: ShardsManifest, chosen: ModelSet, settings: ModelSettings, out: ClipReport,
          rescore: bool, embed: bool, mark: bool, stored_scores: pa.Table | None, log: Log | None
          ) -> tuple[np.ndarray, np.ndarray, pa.Table] | None:
    """The one pass over the shards: its tables and reports into `out`; the embeddings (image, text, metadata) to
    write, when asked for."""
    device = pick_device(settings.device)
    models = Models()
    if rescore:
        models.english, models.multilingual = scores.load_scorers(chosen, device)
    if embed:
        models.embed = load_clip(chosen.embed, device, settings.embed_precision)
    if mark:
        models.watermark, models.watermark_spec = load_watermark_model(chosen.watermark, device)
    keep = None if rescore else scores.kept_keys(out.scores if out.scores is not None else stored_scores)
    out.decode_path = decode_path(settings, device.type)
    with store.local_copies([s.tar for s in download.keys()]) as local:
        result = one_pass(local, models, keep, settings.batch_size, settings.decode_workers, out.decode_path, log)
    if rescore:
        out.scores = scores.score_table(result)
        out.score_report = result.score_report
    if mark:
        out.watermark, out.watermark_report = watermark_table(result)
    if not embed:
        return None
    assert models.embed is not None
    img, txt, meta, out.embed_report = embedding_arrays(result, models.embed)
    return img, txt, meta.append_column("model", pa.array([chosen.embed.name] * meta.num_rows, pa.string()))
