"""A whole download: plan the shards, skip the complete ones, spread the rest over processes, write the list of
complete shards last.

With at least as many shards as processes, each process takes whole shards. With fewer, every shard is split
into contiguous pieces so that all processes work (`--processes 16` on 20,000 URLs uses 16 cores); the pieces
come back to this process, which joins them into the same bytes one process would have written.

Workers are forked from a fork server: the parent may run threads (Dagster, boto3) that a plain fork would
copy mid-lock, and spawn re-imports everything per worker, the CLI's `__main__` included.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core import paths
from laion_assets.core.download.plan import Plan, build_manifest, make_plan, resume
from laion_assets.core.download.reader import InputColumns, Inputs, read_inputs
from laion_assets.core.download.report import DownloadReport, ShardStats
from laion_assets.core.download.runner import ProgressFn, ShardRunner, WorkItem
from laion_assets.core.download.writer import Piece, write_shard
from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage

WORKER_MODULES = ("laion_assets.core.download.runner", "laion_assets.core.download.fetch",
                  "laion_assets.core.download.resize")


def split_work(todo: list[Any], processes: int) -> list[list[WorkItem]]:
    """Work items per process: whole shards round-robin, or every shard cut into pieces when there are fewer
    shards than processes."""
    if not todo:
        return []
    if len(todo) >= processes:
        items = [WorkItem(s, s.lo, s.hi) for s in todo]
    else:
        items = []
        for s in todo:
            k = max(1, min(math.ceil(processes / len(todo)), s.hi - s.lo))
            bounds = [s.lo + (s.hi - s.lo) * i // k for i in range(k + 1)]
            items += [WorkItem(s, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
    n = min(processes, len(items))
    return [items[p::n] for p in range(n)]


def download(source: str | Inputs, store: Storage, prefix: str, settings: DownloadSettings,
             columns: InputColumns | None = None, progress: ProgressFn | None = None,
             log: Callable[[str], None] | None = None) -> DownloadReport:
    """Download every URL of a URL list (a local Parquet file, or its input columns) into shards under `prefix`
    of `store`; resumable."""
    start = time.perf_counter()
    inputs = source if isinstance(source, Inputs) else read_inputs(source, columns)
    plan = make_plan(inputs, settings)
    manifest_key = paths.shards_manifest(prefix)
    store.delete(manifest_key)  # first: until this download ends, nobody reads a list of shards being redone
    store.remove_stale_temporaries(prefix)
    state = resume(store, prefix, plan)
    report = DownloadReport(shards=len(plan.shards), shards_skipped=len(state.done), shards_redone=state.redone,
                            shards_removed=len(state.removed))
    if log:
        log(f"{plan.rows} URLs in {len(plan.shards)} shards; {len(state.done)} already complete, {len(state.todo)} to"
            f" do ({state.redone} no longer match the input or settings); {len(state.removed)} beyond the plan removed")
    processes = max(1, settings.processes or (os.cpu_count() or 1))
    work = split_work(state.todo, processes)
    new: list[ShardStats] = []
    if work:
        with store.staging_dir() as staging:
            if len(work) == 1:
                runner = ShardRunner(inputs, plan, settings, store, prefix, staging, progress)
                new = asyncio.run(runner.run(work[0])).shards
            else:
                inputs_file = os.path.join(staging, "inputs.arrow")
                inputs.save(inputs_file)
                job = _Job(inputs_file, settings, store, prefix, staging, plan,
                           {k: v for k, v in os.environ.items() if k.startswith("AWS_")})
                new = _run_processes(job, work, progress)
    done = {**state.done, **{s.name: s for s in new}}
    for stats in done.values():
        report.add(stats)
    report.rows = sum(s.count for s in new)
    manifest = build_manifest(prefix, plan, done)
    store.write_bytes(manifest_key, manifest.to_json())
    report.manifest = manifest
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pickled to it (the Storage carries its S3 options, not a client)."""

    inputs_file: str  # the input columns as an Arrow file in the shared staging folder
    settings: DownloadSettings
    store: Storage
    prefix: str
    staging: str
    plan: Plan
    # The forkserver was started with the environment of whenever the first download ran; boto3 reads
    # credentials, region and endpoint from the environment, so workers get the parent's as it is now.
    aws_env: dict[str, str] = field(default_factory=dict)


def _worker(job: _Job, work: list[WorkItem], messages: Any) -> None:
    """A worker process: downloads its work items and reports progress, shards and pieces on the queue."""
    try:
        for name in [k for k in os.environ if k.startswith("AWS_") and k not in job.aws_env]:
            del os.environ[name]
        os.environ.update(job.aws_env)
        inputs = Inputs.load(job.inputs_file)
        runner = ShardRunner(inputs, job.plan, job.settings, job.store, job.prefix, job.staging,
                             lambda n, k: messages.put(("progress", n, k)))
        result = asyncio.run(runner.run(work))
        messages.put(("done", [s.to_json() for s in result.shards], [p.save() for p in result.pieces]))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        messages.put(("error", traceback.format_exc()))


class _Joiner:
    """Joins the pieces of split shards as they arrive, in a thread, once a shard's pieces are all in."""

    def __init__(self, job: _Job, work: list[list[WorkItem]]) -> None:
        self.job = job
        self.expected: dict[str, int] = {}
        for items in work:
            for item in items:
                if (item.lo, item.hi) != (item.shard.lo, item.shard.hi):
                    self.expected[item.shard.name] = self.expected.get(item.shard.name, 0) + 1
        self.pieces: dict[str, list[Piece]] = {}
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="shard-joiner")
        self.writes: list[Future[ShardStats]] = []

    def add(self, piece_paths: list[str]) -> None:
        for path in piece_paths:
            piece = Piece.load(path)
            got = self.pieces.setdefault(piece.shard.name, [])
            got.append(piece)
            if len(got) == self.expected[piece.shard.name]:
                self.writes.append(self.pool.submit(write_shard, got, self.job.store, self.job.prefix,
                                                    self.job.plan.settings, self.job.staging))

    def results(self) -> list[ShardStats]:
        return [w.result() for w in self.writes]


def _run_processes(job: _Job, work: list[list[WorkItem]], progress: ProgressFn | None) -> list[ShardStats]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_MODULES))
    messages = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(job, items, messages), daemon=True) for items in work]
    for proc in workers:
        proc.start()
    joiner = _Joiner(job, work)
    stats: list[ShardStats] = []
    errors: list[str] = []
    finished = 0
    try:
        while finished < len(workers):
            try:
                msg = messages.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead and messages.empty():
                    raise RuntimeError(f"download worker died with exit code {dead[0].exitcode}") from None
                continue
            if msg[0] == "progress":
                if progress:
                    progress(msg[1], msg[2])
            elif msg[0] == "done":
                stats.extend(ShardStats.from_json(s) for s in msg[1])
                joiner.add(msg[2])
                finished += 1
            else:
                errors.append(msg[1])
                finished += 1
        stats.extend(joiner.results())
    finally:
        joiner.pool.shutdown(wait=True, cancel_futures=True)
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    if errors:
        raise RuntimeError(f"{len(errors)} download worker(s) failed:\n{errors[0]}")
    return sorted(stats, key=lambda s: s.shard)
