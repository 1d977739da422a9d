"""A second chance for a finished download (`--retry-failed`): only the rows whose failure was transient
(`report.is_transient`: timeouts, 5xx, 408/425/429, resets, temporary DNS failures, a robots.txt that never
answered) are fetched again; successes, other 4xx, NXDOMAIN, refused or forbidden hosts, policy refusals and
images that failed to decode are left as they are.

A shard with retried rows is rewritten whole and deterministically: the same keys in the same order, every
untouched sample copied byte for byte from the old tar (the writer's tar headers are a function of the name and
size alone), a retried row's new sample where it now succeeded, and the old rows with the retried ones replaced.
Each retried row counts one more run (`runs`) and adds its image requests to `attempts`. The new tar and Parquet
file are made in the local staging folder first; then the shard's marker is removed, the two files put in place
(each atomically) and the marker written again, so a run killed in between leaves the shard incomplete (the next
run redoes it) and never a tar and rows that disagree.

The retries run in this process, one asyncio loop, whatever `processes` says: they are a small share of a
download, and the rewrite needs all of a shard's results at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from laion_assets.core import paths
from laion_assets.core.download.plan import Plan, ShardPlan
from laion_assets.core.download.reader import Inputs
from laion_assets.core.download.report import ShardStats, is_transient
from laion_assets.core.download.runner import ProgressFn, ShardRunner
from laion_assets.core.download.writer import (
    ROW_SCHEMA,
    ShardLayout,
    count_rows,
    img2dataset_counts,
    rows_table,
    sample_members,
    write_tar,
)
from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage


@dataclass
class RetryOutcome:
    """What the second chance did."""

    stats: dict[str, ShardStats]  # the rewritten shards' new markers
    retried: int = 0
    recovered: int = 0


def _complete_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a shard written before `attempts` and `runs` existed get them (unknown attempts, one run)."""
    for row in rows:
        if "runs" not in row or row["runs"] is None:
            row["runs"] = 1
        row.setdefault("attempts", None)
    return rows


def retryable(rows: list[dict[str, Any]]) -> list[int]:
    """Positions of the rows whose failure is transient."""
    return [i for i, r in enumerate(rows) if is_transient(r["status"], r["error_message"], r["http_status"])]


Results = dict[int, tuple[dict[str, Any], dict[str, bytes]]]  # row position -> (new row, its sample's files)


class RetryRunner(ShardRunner):
    """Fetches chosen rows again, with the same fetch, resize and page opt-out rules as the first run: one
    Fetcher (one policy cache) for all shards, a shard's rows at once, each shard committed before the next."""

    async def retry(self, jobs: list[tuple[ShardPlan, list[dict[str, Any]], list[int]]],
                    commit: Callable[[ShardPlan, list[dict[str, Any]], Results], None]) -> None:
        from laion_assets.core.download.fetch import Fetcher  # as in ShardRunner.run: workers' imports only

        self._loop = asyncio.get_running_loop()
        self._resize_pool = ThreadPoolExecutor(self.settings.resize_threads, thread_name_prefix="resize")
        slots = asyncio.Semaphore(self.settings.in_flight)
        try:
            async with Fetcher(self.settings.fetch) as fetcher:
                for shard, rows, positions in jobs:
                    async def one(pos: int, shard: ShardPlan = shard, rows: list[dict[str, Any]] = rows
                                  ) -> tuple[int, tuple[dict[str, Any], dict[str, bytes]]]:
                        old = rows[pos]
                        extra = self.inputs.extras(shard.lo + pos, shard.lo + pos + 1)[0]
                        # With the saved input columns, hash and exif columns as at first.
                        row = self._new_row(old["key"], old["url"], old["caption"], old["language"], extra)
                        row["attempts"] = old["attempts"] or 0
                        row["runs"] = (old["runs"] or 1) + 1
                        async with slots:
                            files = await self._process(fetcher, shard.lo + pos, row["url"], row, extra)
                        self.progress.add(row["status"] == "success")
                        return pos, (row, files)

                    done = dict(await asyncio.gather(*(one(p) for p in positions)))
                    await asyncio.to_thread(commit, shard, rows, done)
            self.progress.flush()
        finally:
            self._resize_pool.shutdown(wait=False, cancel_futures=True)


def _old_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a shard's tar in file order: (key, {field: bytes})."""
    with tarfile.open(tar_path, "r") as tar:
        key, members = None, {}
        for info in tar:
            name_key, _, field = info.name.partition(".")
            if key is not None and name_key != key:
                yield key, members
                members = {}
            key = name_key
            data = tar.extractfile(info)
            members[field] = data.read() if data else b""
        if key is not None:
            yield key, members


def _merged(rows: list[dict[str, Any]], new: Results, old_tar: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Old samples as they were, with the retried rows' new samples in their key's place."""
    old = _old_samples(old_tar)
    pending = next(old, None)
    for pos, row in enumerate(rows):
        if pos in new:
            if pending is not None and pending[0] == row["key"]:
                pending = next(old, None)  # a retried row had no sample; never keep a stale one if it did
            fresh, files = new[pos]
            if files:
                yield fresh["key"], sample_members(fresh, files)
        elif pending is not None and pending[0] == row["key"]:
            yield pending
            pending = next(old, None)
    if pending is not None:
        raise RuntimeError(f"sample {pending[0]} of the old tar has no row: the shard does not match its rows")


def rewrite_shard(store: Storage, prefix: str, shard: ShardPlan, old: ShardStats, rows: list[dict[str, Any]],
                  new: Results, staging: str, layout: ShardLayout | None = None) -> ShardStats:
    """The shard with the retried rows replaced; untouched samples and rows as they were. `layout`: the plan's, a
    webdataset one (the rows' added columns)."""
    keys = paths.shard(prefix, shard.name)
    old_tar = os.path.join(staging, f"{shard.name}.old.tar")
    store.download(keys.tar, old_tar)
    tar_path = os.path.join(staging, f"{shard.name}.tar")
    rows_path = os.path.join(staging, f"{shard.name}.parquet")
    merged = [new[i][0] if i in new else r for i, r in enumerate(rows)]
    try:
        write_tar(tar_path, _merged(rows, new, old_tar))
        pq.write_table(rows_table(merged, ROW_SCHEMA if layout is None else layout.schema()), rows_path,
                       compression="zstd")
        stats = ShardStats(shard=old.shard, name=old.name, count=old.count, rows=old.rows,
                           input_fingerprint=old.input_fingerprint, settings=old.settings)
        count_rows(stats, merged)
        img2dataset_counts(stats, merged, time.perf_counter())  # its counts anew, its times the first write's
        stats.start_time, stats.end_time, stats.duration = old.start_time, old.end_time, old.duration
        stats.bytes_written = os.path.getsize(tar_path)
        stats.duration_s = old.duration_s
        store.delete(keys.stats)  # until the marker is back, the shard is incomplete (tar and rows change)
        store.put_file(tar_path, keys.tar)
        store.put_file(rows_path, keys.rows)
        store.write_bytes(keys.stats, stats.to_json())
    finally:
        for path in (old_tar, tar_path, rows_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return stats


def run(inputs: Inputs, store: Storage, prefix: str, plan: Plan, done: dict[str, ShardStats],
        settings: DownloadSettings, staging: str, progress: ProgressFn | None = None) -> RetryOutcome:
    """Fetch the transient failures of the complete shards `done` again and rewrite the shards that had any."""
    outcome = RetryOutcome({})
    by_name = {s.name: s for s in plan.shards}
    jobs = []
    for name in sorted(done):
        stats = done[name]
        if stats.statuses.get("success", 0) + stats.statuses.get("failed_to_resize", 0) == stats.count:
            continue  # nothing that could be transient: no need to read its rows
        rows = _complete_rows(store.read_parquet(paths.shard(prefix, name).rows).to_pylist())
        positions = retryable(rows)
        if positions:
            jobs.append((by_name[name], rows, positions))
    if not jobs:
        return outcome

    def commit(shard: ShardPlan, rows: list[dict[str, Any]], new: Results) -> None:
        outcome.stats[shard.name] = rewrite_shard(store, prefix, shard, done[shard.name], rows, new, staging,
                                                  plan.layout)
        outcome.retried += len(new)
        outcome.recovered += sum(row["status"] == "success" for row, _ in new.values())

    runner = RetryRunner(inputs, plan, settings, store, prefix, staging, progress)
    asyncio.run(runner.retry(jobs, commit))
    return outcome
