"""CLIP image-caption similarity of every downloaded sample, the threshold of the model that scored it, and keep.

English captions are scored by the English CLIP, all others (other languages and nolang) by the multilingual one;
each row records the model's name and the identity of its weights. A rescore is skipped when the stored rows
were made by the same weights from the same image bytes: then only the (possibly changed) thresholds are
re-applied to the stored similarities.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from laion_assets.core.clip.loader import is_english
from laion_assets.core.clip.models import ClipSpec, LoadedClip, load_clip, weights_id
from laion_assets.core.clip.onepass import PassResult, StageReport
from laion_assets.core.clip.registry import ModelSet
from laion_assets.core.clip.shards import downloaded_samples
from laion_assets.core.download.plan import ShardsManifest
from laion_assets.core.progress import Log
from laion_assets.core.storage import Storage

SCORE_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("language", pa.string()),
    ("sha256", pa.string()), ("model", pa.string()), ("weights", pa.string()), ("similarity", pa.float32()),
    ("threshold", pa.float32()), ("keep", pa.bool_()), ("status", pa.string()), ("error_message", pa.string()),
])


def spec_weights(spec: ClipSpec) -> str:
    return weights_id(spec.arch, spec.pretrained)


def score_table(result: PassResult) -> pa.Table:
    """A pass's score rows, sorted by key, with its time in the report."""
    result.score_report.seconds = result.seconds
    return pa.Table.from_pylist(sorted(result.score_rows, key=lambda r: r["key"]), schema=SCORE_SCHEMA)


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


def reused_scores(store: Storage, download: ShardsManifest, chosen: ModelSet, previous: pa.Table | None,
                  reuse: bool = True, log: Log | None = None) -> tuple[pa.Table, StageReport] | None:
    """`previous` re-filtered with the current thresholds when it still holds (see `can_reuse`), else None."""
    start = time.perf_counter()
    if not reuse or previous is None or not can_reuse(previous, downloaded_samples(store, download.keys()), chosen):
        return None
    table = refilter(previous, {spec_weights(s): s.threshold for s in (chosen.clip_en, chosen.clip_multi)})
    report = StageReport(samples=table.num_rows, kept=sum(table["keep"].to_pylist()), refiltered_only=True,
                         failed=table["status"].to_pylist().count("failed_to_decode"),
                         seconds=time.perf_counter() - start)
    if log:
        log(f"re-filtered {table.num_rows} stored similarities: {report.kept} kept")
    return table, report


def load_scorers(chosen: ModelSet, device: torch.device) -> tuple[LoadedClip, LoadedClip]:
    """The English and multilingual CLIPs (one model when they are the same)."""
    english = load_clip(chosen.clip_en, device)
    return english, english if chosen.clip_multi == chosen.clip_en else load_clip(chosen.clip_multi, device)


def similarity_histogram(scores: pa.Table, bins: int = 10) -> dict[str, int]:
    sims = np.array([s for s in scores["similarity"].to_pylist() if s is not None], dtype=np.float32)
    if not len(sims):
        return {}
    counts, edges = np.histogram(sims, bins=bins)
    return {f"{e:.2f}": int(c) for e, c in zip(edges[:-1], counts, strict=True)}
