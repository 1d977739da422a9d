"""What a download did: per shard (its `_stats.json`, the completion marker) and in all."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core.records import JsonRecord

STATUSES = ("success", "failed_to_download", "failed_to_resize", "skipped_by_policy")
# Statuses only some downloads can have (verify_hash): listed in totals when they occurred.
OTHER_STATUSES = ("hash_mismatch",)


@dataclass
class ShardStats(JsonRecord):
    """A shard's marker: its counts, and what it was made from, so that a rerun can tell whether it still
    matches the plan (same input rows, same row range, same output settings)."""

    shard: int
    name: str = ""
    count: int = 0
    rows: list[int] = field(default_factory=list)  # [first row, end row) of the input
    input_fingerprint: str = ""  # hash of those input rows (url, caption, language)
    settings: str = ""  # hash of the settings that change the shard's bytes
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    bytes_downloaded: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    # img2dataset's own fields of the same file (its readers and resharders use them): what failed before an
    # image was decoded counts as failed_to_download there (a skip, a hash mismatch), and status_dict counts
    # the error messages and "success".
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    duration: float = 0.0
    start_time: float = 0.0
    end_time: float = 0.0
    status_dict: dict[str, int] = field(default_factory=dict)


@dataclass
class DownloadReport:
    shards: int = 0
    shards_skipped: int = 0  # complete and matching the plan: not redone
    shards_redone: int = 0  # had a marker that did not match the plan (input or settings changed)
    shards_removed: int = 0  # beyond a shrunk plan
    rows: int = 0  # rows processed in this run
    input_malformed: int = 0  # lines of the URL list skipped as malformed (counted by the reader)
    statuses: Counter[str] = field(default_factory=Counter)  # all shards, skipped ones included
    errors: Counter[str] = field(default_factory=Counter)
    bytes_downloaded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    manifest: Any = None  # the ShardsManifest written last

    def add(self, stats: ShardStats) -> None:
        self.statuses.update(stats.statuses)
        self.errors.update(stats.errors)
        self.bytes_downloaded += stats.bytes_downloaded
        self.bytes_written += stats.bytes_written

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def success_rate(self) -> float:
        return self.statuses["success"] / self.total if self.total else 0.0

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        shown = [*STATUSES, *(s for s in OTHER_STATUSES if self.statuses[s])]
        parts = ", ".join(f"{s} {self.statuses[s]}" for s in shown)
        return (f"{self.total} URLs in {self.shards} shards ({self.shards_skipped} already complete,"
                f" {self.shards_redone} redone): {parts}; {self.rows} processed in {self.seconds:.1f} s ({rate:.0f}/s)")

    def metadata(self) -> dict[str, Any]:
        return {
            "urls": self.total,
            "success_rate": round(self.success_rate, 4),
            **{s: self.statuses[s] for s in (*STATUSES, *OTHER_STATUSES)},
            "shards": self.shards,
            "shards_already_complete": self.shards_skipped,
            "shards_redone": self.shards_redone,
            "shards_removed": self.shards_removed,
            "processed_this_run": self.rows,
            "input_malformed": self.input_malformed,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.rows / self.seconds, 1) if self.seconds else 0.0,
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_written": self.bytes_written,
            "error_histogram": dict(self.errors.most_common(20)),
        }
