"""Which shards a download makes, which of them are already complete, and the list it leaves when done.

A shard is complete only if its `_stats.json` matches the plan: the same input rows (a fingerprint of their
url, caption and language), the same row range and the same output settings (size, mode, format, quality...).
A mismatch redoes the shard; shards beyond a shrunk plan are removed. The bucket's `_manifest.json` (the
complete shards with their counts) is removed when a download starts and written when it ends, so a reader
never sees an orphan or half-written shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core import paths
from laion_assets.core.download.reader import Inputs
from laion_assets.core.download.report import OTHER_STATUSES, STATUSES, ShardStats
from laion_assets.core.records import JsonRecord
from laion_assets.core.settings import DownloadSettings, settings_hash
from laion_assets.core.storage import Storage


@dataclass(frozen=True)
class ShardPlan:
    shard: int
    name: str
    lo: int  # first input row
    hi: int  # end input row
    fingerprint: str  # of the input rows [lo, hi)

    def key(self, index: int, widths: tuple[int, int]) -> str:
        """The sample key of input row `index`, as img2dataset makes it: shard digits, then row digits."""
        return f"{self.shard:0{widths[0]}d}{index - self.lo:0{widths[1]}d}"


@dataclass(frozen=True)
class Plan:
    shards: tuple[ShardPlan, ...]
    widths: tuple[int, int]
    settings: str  # hash of what changes the output's bytes
    rows: int
    layout: Any = None  # the writer's ShardLayout (output format, row columns); None: webdataset, our rows

    def matches(self, stats: ShardStats, shard: ShardPlan) -> bool:
        return (stats.rows == [shard.lo, shard.hi] and stats.input_fingerprint == shard.fingerprint
                and stats.settings == self.settings and stats.count == shard.hi - shard.lo)


def key_widths(rows: int, samples_per_shard: int) -> tuple[int, int]:
    """Digits of the shard and sample parts of a key, as img2dataset chooses them."""
    shards = max(1, math.ceil(rows / samples_per_shard))
    return max(5, math.ceil(math.log10(shards + 1))), max(1, math.ceil(math.log10(samples_per_shard)))


def output_settings(settings: DownloadSettings) -> dict[str, Any]:
    """The download settings (beyond the resize's) that change a shard's files."""
    return {"output_format": settings.output_format, "save_additional_columns": list(settings.save_additional_columns),
            "compute_hash": settings.compute_hash, "verify_hash": settings.verify_hash, "bbox_col": settings.bbox_col,
            "extract_exif": settings.extract_exif, "min_image_bytes": settings.min_image_bytes}


def make_plan(inputs: Inputs, settings: DownloadSettings, start_shard: int = 0, layout: Any = None) -> Plan:
    """The shards of a download; numbered from `start_shard` (incremental_mode extend: after existing ones)."""
    rows, per = inputs.num_rows, settings.samples_per_shard
    if per < 1:
        raise ValueError(f"samples_per_shard must be at least 1, not {per}")
    widths = key_widths(rows, per)
    if start_shard:
        shards_needed = start_shard + max(1, math.ceil(rows / per))
        widths = (max(widths[0], math.ceil(math.log10(shards_needed + 1))), widths[1])
    if settings.shard_digits:
        if settings.shard_digits < widths[0] and 10 ** settings.shard_digits < start_shard + math.ceil(rows / per):
            raise ValueError(f"shard_digits {settings.shard_digits} cannot number {math.ceil(rows / per)} shards")
        widths = (settings.shard_digits, widths[1])
    bounds = [(lo, min(lo + per, rows)) for lo in range(0, rows, per)]
    shards = tuple(ShardPlan(s, f"{s:0{widths[0]}d}", lo, hi, inputs.fingerprint(lo, hi))
                   for s, (lo, hi) in enumerate(bounds, start=start_shard))
    return Plan(shards, widths, settings_hash(settings.resize, {"samples_per_shard": per, "widths": widths},
                                              output_settings(settings)), rows, layout)


@dataclass
class ResumeState:
    done: dict[str, ShardStats] = field(default_factory=dict)  # complete shards that match the plan
    todo: list[ShardPlan] = field(default_factory=list)
    redone: int = 0
    removed: list[str] = field(default_factory=list)


def resume(store: Storage, prefix: str, plan: Plan, keep_others: bool = False) -> ResumeState:
    """Sort the plan's shards into complete and to do; clear markers that no longer match, and the files of
    shards the plan no longer has (unless `keep_others`: incremental_mode extend keeps the earlier shards)."""
    state = ResumeState()
    planned = {s.name: s for s in plan.shards}
    files: dict[str, list[str]] = {}
    for key in store.list(prefix):
        name = paths.shard_of(prefix, key)
        if name is not None:
            files.setdefault(name, []).append(key)
    for name, keys in sorted(files.items()):
        if name not in planned and keep_others:
            continue
        if name not in planned:
            marker = paths.shard(prefix, name).stats
            for key in sorted(keys, key=lambda k: k != marker):  # the marker first
                store.delete(key)
            state.removed.append(name)
            continue
        marker = paths.shard(prefix, name).stats
        if marker not in keys:
            continue
        stats = ShardStats.from_json(store.read_bytes(marker))
        if plan.matches(stats, planned[name]):
            state.done[name] = stats
        else:
            store.delete(marker)  # no longer trusted, even if this run is killed before redoing it
            state.redone += 1
    state.todo = [s for s in plan.shards if s.name not in state.done]
    return state


# --- the list of complete shards ---------------------------------------------------------------------------

@dataclass
class ShardEntry(JsonRecord):
    name: str
    tar: str  # file names, relative to the download's prefix
    rows: str
    stats: str
    count: int
    successes: int


@dataclass
class ShardsManifest(JsonRecord):
    """A finished download: every shard of the plan, complete. Written last. `prefix` is the download's folder in
    its storage; shard file names are relative to it."""

    prefix: str
    rows: int
    settings: str
    statuses: dict[str, int]
    shards: list[ShardEntry]

    def committed_at(self) -> str:
        return paths.shards_manifest(self.prefix)

    def keys(self) -> list[paths.ShardKeys]:
        return [paths.ShardKeys(paths.join(self.prefix, s.tar), paths.join(self.prefix, s.rows),
                                paths.join(self.prefix, s.stats)) for s in self.shards]


def build_manifest(prefix: str, plan: Plan, stats: dict[str, ShardStats]) -> ShardsManifest:
    missing = [s.name for s in plan.shards if s.name not in stats]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} are not complete; the manifest lists complete downloads only")
    totals = {s: sum(st.statuses.get(s, 0) for st in stats.values()) for s in STATUSES}
    totals.update({s: n for s in OTHER_STATUSES if (n := sum(st.statuses.get(s, 0) for st in stats.values()))})
    entries = []
    output_format = getattr(plan.layout, "output_format", "webdataset")
    for s in plan.shards:
        keys = paths.shard("", s.name)
        # The samples: the tar, the folder of files, or the Parquet file that holds the images too.
        samples = {"webdataset": keys.tar, "files": s.name + "/", "parquet": keys.rows}[output_format]
        entries.append(ShardEntry(s.name, samples, keys.rows, keys.stats, stats[s.name].count,
                                  stats[s.name].statuses.get("success", 0)))
    return ShardsManifest(prefix, plan.rows, plan.settings, totals, entries)


class IncompleteDownloadError(RuntimeError):
    """The image shards a stage wants to read are not complete (no manifest)."""


def read_manifest(store: Storage, prefix: str) -> ShardsManifest:
    key = paths.shards_manifest(prefix)
    if not store.exists(key):
        raise IncompleteDownloadError(f"no complete download at {store.uri(prefix)} (its {paths.SHARDS_MANIFEST} is "
                                      "missing: the download has not finished)")
    return ShardsManifest.from_json(store.read_bytes(key))

