"""What a download did: per shard (its `_stats.json`, the completion marker) and in all; and which failed rows
deserve a second chance (`is_transient`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core.records import JsonRecord

STATUSES = ("success", "failed_to_download", "failed_to_resize", "skipped_by_policy")
# Statuses only some downloads can have (verify_hash): listed in totals when they occurred.
OTHER_STATUSES = ("hash_mismatch",)
TRANSIENT_HTTP = frozenset({408, 425, 429})
POLICY_UNREACHABLE = "policy_unreachable"  # robots.py starts such a refusal with it
PAGE_OPT_OUT = "page_opt_out"  # starts the reason of an image skipped because its page opted out of AI use
# Error texts the fetcher writes for failures another try may change, and for those it never will. The DNS
# reasons are the resolver's (dns_temporary: SERVFAIL, a timeout, EAI_AGAIN; dns_nxdomain: the name does not exist).
_TRANSIENT_ERRORS = ("dns_temporary", "temporary failure in name resolution", "try again", "timeout", "timed out",
                     "no answer within", "total deadline", "serverdisconnected", "clientpayloaderror",
                     "clientoserror", "connection reset", "connectionreset", "reset by peer", "not enough data",
                     "response payload is not completed", "connection closed")
_PERMANENT_ERRORS = ("dns_nxdomain", "name or service not known", "no address associated", "nodename nor servname",
                     "forbidden", "not http(s)", "no host", "bad port", "no url", "over the cap", "redirects")


def is_transient(status: str | None, error: str | None, http_status: int | None = None) -> bool:
    """Whether a row's failure may go away on another try (another run, hours later): timeouts, HTTP 5xx, 408,
    425 and 429, connection resets and bodies cut short, temporary DNS failures, a robots.txt that never answered.
    Never a success, another 4xx, a name that does not exist, a refused or forbidden address, a policy refusal,
    or an image that failed to decode (the same bytes would fail again)."""
    if status == "skipped_by_policy":
        return (error or "").startswith(POLICY_UNREACHABLE)
    if status != "failed_to_download":
        return False
    if http_status is not None and http_status != 200:  # 200: over the byte cap, and so it stays
        return http_status >= 500 or http_status in TRANSIENT_HTTP
    text = (error or "").lower()
    if any(p in text for p in _PERMANENT_ERRORS):
        return False
    return any(t in text for t in _TRANSIENT_ERRORS)


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
    retryable: int = 0  # rows whose failure is transient (is_transient): what --retry-failed would fetch again
    runs: int = 1  # downloads that wrote this shard: 1, and one more for each rewrite by --retry-failed
    page_opt_outs: int = 0  # images skipped because their page said noai / noimageai


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
    retryable: int = 0  # transient failures left in all shards
    page_opt_outs: int = 0  # skipped_by_policy because the page opted out of AI use
    retried: int = 0  # rows fetched again this run (--retry-failed)
    recovered: int = 0  # of which now succeeded
    shards_rewritten: int = 0
    runs: int = 1  # the most downloads any shard has had (1, plus the --retry-failed runs that rewrote it)
    seconds: float = 0.0
    manifest: Any = None  # the ShardsManifest written last

    def add(self, stats: ShardStats) -> None:
        self.statuses.update(stats.statuses)
        self.errors.update(stats.errors)
        self.bytes_downloaded += stats.bytes_downloaded
        self.bytes_written += stats.bytes_written
        self.retryable += stats.retryable
        self.page_opt_outs += stats.page_opt_outs
        self.runs = max(self.runs, stats.runs)

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
        retried = (f"; {self.retried} transient failures retried in {self.shards_rewritten} shards, {self.recovered}"
                   " recovered" if self.retried else "")
        return (f"{self.total} URLs in {self.shards} shards ({self.shards_skipped} already complete,"
                f" {self.shards_redone} redone): {parts}; {self.rows} processed in {self.seconds:.1f} s ({rate:.0f}/s)"
                f"{retried}; {self.retryable} transient failures left")

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
            "skipped_page_opt_out": self.page_opt_outs,
            "retryable_failures": self.retryable,
            "retried_this_run": self.retried,
            "recovered_this_run": self.recovered,
            "shards_rewritten": self.shards_rewritten,
            "runs": self.runs,
            "error_histogram": dict(self.errors.most_common(20)),
        }
