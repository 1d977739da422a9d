"""A whole download: plan the shards, skip the complete ones, spread the rest over processes, write the list of
complete shards last.

With at least as many shards as processes, each process takes whole shards. With fewer, every shard is split
into contiguous pieces so that all processes work (`--processes 16` on 20,000 URLs uses 16 cores); the pieces
come back to this process, which joins them into the same bytes one process would have written.

The processes are a `concurrent.futures.ProcessPoolExecutor`, one task per process (its work items, run as one
stream). Workers are forked from a fork server: the parent may run threads (Dagster, boto3) that a plain fork
would copy mid-lock, and spawn re-imports everything per worker, the CLI's `__main__` included. A worker that
dies (killed, out of memory) breaks the pool, which stops the others: the download fails with
BrokenProcessPool. An exception in a worker fails it with the worker's traceback, once the others are done.
The executor replaced a hand-written pool (worker processes and a message queue) that was no faster:
benchmarks/bench_pool.py, 1,000 LAION-size images, 2 processes, three runs of 5 alternating pairs at load 0.5-2.7,
took 0.99x, 0.99x and 1.00x its median time at 100 samples per shard, 1.01x, 1.00x and 1.03x at 10 (runs of
2.3-3.2 s, each side within about 0.2 s of its median), and 0.98-1.03x its CPU seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from laion_assets.core import paths
from laion_assets.core.download import forkserver, retry
from laion_assets.core.download.plan import Plan, build_manifest, make_plan, resume
from laion_assets.core.download.reader import InputColumns, Inputs, read_inputs
from laion_assets.core.download.report import DownloadReport, ShardStats
from laion_assets.core.download.runner import ProgressFn, ShardRunner, WorkItem
from laion_assets.core.download.writer import Piece, ShardLayout, write_shard
from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage

INPUTS_FILE = "inputs.arrow"  # in the staging folder: the input columns, which every worker maps


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


def run(source: str | Inputs, store: Storage, prefix: str, settings: DownloadSettings,
        columns: InputColumns | None = None, progress: ProgressFn | None = None,
        log: Callable[[str], None] | None = None) -> DownloadReport:
    """The download stage's entry point (the image_shards asset and `laion-assets download` call it): every URL of
    a URL list (a file or folder in any format `inputs.py` reads, or its input columns) into shards under `prefix`
    of `store`; resumable. With `settings.retry_failed`, the transient failures of shards already complete are
    fetched again (`retry.py`)."""
    start = time.perf_counter()
    if forkserver.processes(settings) > 1:
        forkserver.start(settings)  # first: its imports (half a second) overlap reading the inputs and planning
    # Before this run's staging folder: a killed run's (its input file the size of a list) goes first.
    store.remove_stale_temporaries(prefix)
    with store.staging_dir() as staging:
        if isinstance(source, Inputs):
            inputs = source
        else:
            columns = columns or InputColumns()
            keep = tuple(dict.fromkeys([*columns.keep, *settings.kept_columns()]))
            # Into the staging folder as it streams, mapped from there by this process and the workers.
            inputs = read_inputs(source, dataclasses.replace(columns, keep=keep),
                                 spill=os.path.join(staging, INPUTS_FILE), chunk_rows=settings.samples_per_shard)
        report = _download(inputs, store, prefix, settings, staging, progress, log)
    report.seconds = time.perf_counter() - start
    return report


def _download(inputs: Inputs, store: Storage, prefix: str, settings: DownloadSettings, staging: str,
              progress: ProgressFn | None, log: Callable[[str], None] | None) -> DownloadReport:
    missing = [c for c in settings.kept_columns() if c not in inputs.extra]
    if missing:
        raise ValueError(f"the URL list has no column {missing[0]!r} (asked by save_additional_columns, bbox_col or "
                         f"verify_hash; kept columns: {', '.join(inputs.extra) or 'none'})")
    manifest_key = paths.shards_manifest(prefix)
    store.delete(manifest_key)  # first: until this download ends, nobody reads a list of shards being redone
    layout = layout_of(inputs, settings)
    if settings.retry_failed and layout is not None and layout.output_format != "webdataset":
        # retry.py rewrites webdataset shards (their rows with any added columns); files and parquet are not yet.
        raise ValueError(f"retry_failed works on webdataset shards, not {layout.output_format} output; rerun the "
                         "download with incremental_mode incremental instead")
    start_shard = apply_incremental_mode(store, prefix, settings.incremental_mode)
    plan = make_plan(inputs, settings, start_shard, layout)
    state = resume(store, prefix, plan, keep_others=settings.incremental_mode == "extend")
    report = DownloadReport(shards=len(plan.shards), shards_skipped=len(state.done), shards_redone=state.redone,
                            shards_removed=len(state.removed), input_malformed=inputs.malformed)
    if log and inputs.malformed:
        log(f"{inputs.malformed} malformed lines of the URL list skipped (counted in the report)")
    if log:
        log(f"{plan.rows} URLs in {len(plan.shards)} shards; {len(state.done)} already complete, {len(state.todo)} to"
            f" do ({state.redone} no longer match the input or settings); {len(state.removed)} beyond the plan removed")
    work = split_work(state.todo, forkserver.processes(settings))
    new: list[ShardStats] = []
    if len(work) == 1:
        runner = ShardRunner(inputs, plan, settings, store, prefix, staging, progress)
        new = asyncio.run(runner.run(work[0])).shards
    elif work:
        inputs_file = inputs.path
        if not inputs_file:  # given as a table: written where the workers map it
            inputs_file = os.path.join(staging, INPUTS_FILE)
            inputs.save(inputs_file)
        job = _Job(inputs_file, settings, store, prefix, staging, plan,
                   {k: v for k, v in os.environ.items() if k.startswith("AWS_")})
        new = _run_processes(job, work, progress)
    done = {**state.done, **{s.name: s for s in new}}
    if settings.retry_failed and state.done:
        # Only shards complete before this run: those written just now have had their tries.
        second = retry.run(inputs, store, prefix, plan, state.done, settings, staging, progress)
        done |= second.stats
        report.retried, report.recovered, report.shards_rewritten = second.retried, second.recovered, len(second.stats)
        if log:
            log(f"retried {second.retried} transient failures in {len(second.stats)} shards:"
                f" {second.recovered} recovered")
    for stats in done.values():
        report.add(stats)
    report.rows = sum(s.count for s in new)
    manifest = build_manifest(prefix, plan, done)
    store.write_bytes(manifest_key, manifest.to_json())
    report.manifest = manifest
    return report


def layout_of(inputs: Inputs, settings: DownloadSettings) -> ShardLayout | None:
    """The shards' layout: None (webdataset, our rows: the writer's path since the start) unless asked otherwise."""
    saved = settings.saved_columns()
    layout = ShardLayout(
        output_format=settings.output_format,
        extra=pa.schema([inputs.table.schema.field(c) for c in saved]) if saved else None,
        hash_col=settings.compute_hash if settings.compute_hash in ("md5", "sha512") else "",
        exif=settings.extract_exif, image_field=settings.resize.encode_format)
    return None if layout == ShardLayout(image_field=settings.resize.encode_format) else layout


def apply_incremental_mode(store: Storage, prefix: str, mode: str) -> int:
    """img2dataset's incremental modes on the download's folder; the first shard number of this download.
    incremental: resume (complete shards kept, the plan decides the rest); overwrite: the folder emptied first;
    extend: the existing shards kept and this download's numbered after the largest."""
    if mode == "overwrite":
        for key in store.list(prefix):
            store.delete(key)
        return 0
    if mode == "extend":
        numbers = [int(name) for key in store.list(prefix)
                   if (name := paths.shard_of(prefix, key)) is not None and name.isdigit()
                   and key.endswith("_stats.json")]
        return max(numbers, default=-1) + 1
    return 0


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


class WorkerError(RuntimeError):
    """An exception in a worker process, with its traceback as text (the exception itself may not pickle)."""


_progress_queue: Any = None  # in a worker process: where its progress goes to the parent, if anywhere


def _start_worker(messages: Any) -> None:
    global _progress_queue
    _progress_queue = messages


def _worker(job: _Job, work: list[WorkItem]) -> tuple[list[ShardStats], list[str]]:
    """A worker process's one task: downloads its work items; returns the shards it wrote whole and the files
    of the pieces it made (for the parent to join)."""
    try:
        for name in [k for k in os.environ if k.startswith("AWS_") and k not in job.aws_env]:
            del os.environ[name]
        os.environ.update(job.aws_env)
        inputs = Inputs.load(job.inputs_file)
        messages = _progress_queue
        report = None if messages is None else lambda n, k: messages.put((n, k))
        runner = ShardRunner(inputs, job.plan, job.settings, job.store, job.prefix, job.staging, report)
        result = asyncio.run(runner.run(work))
        return result.shards, [p.save() for p in result.pieces]
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        raise WorkerError(traceback.format_exc()) from None


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
                                                    self.job.plan.settings, self.job.staging, self.job.plan.layout))

    def results(self) -> list[ShardStats]:
        return [w.result() for w in self.writes]


def _run_processes(job: _Job, work: list[list[WorkItem]], progress: ProgressFn | None) -> list[ShardStats]:
    """One task per process (its work items as a single stream); progress comes back on a queue drained while
    the tasks run. A worker that dies breaks the pool: the others are stopped and BrokenProcessPool raised."""
    ctx = forkserver.start(job.settings)
    # A SimpleQueue's put writes to the pipe at once (no feeder thread), so a task's progress is all readable
    # by the time its result is.
    messages = ctx.SimpleQueue() if progress else None
    pool = ProcessPoolExecutor(len(work), mp_context=ctx, initializer=_start_worker, initargs=(messages,))
    joiner = _Joiner(job, work)
    stats: list[ShardStats] = []
    errors: list[str] = []
    try:
        pending = {pool.submit(_worker, job, items) for items in work}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while progress and messages is not None and not messages.empty():
                progress(*messages.get())
            for future in done:
                try:
                    shards, pieces = future.result()
                except WorkerError as err:
                    errors.append(str(err))
                    continue
                stats.extend(shards)
                joiner.add(pieces)
        stats.extend(joiner.results())
    except BrokenProcessPool as err:
        raise BrokenProcessPool(f"a download worker process died{_exit_status(pool)}; the others were stopped,"
                                " and the shards they had not finished are redone by the next run") from err
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        joiner.pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise RuntimeError(f"{len(errors)} download worker(s) failed:\n{errors[0]}")
    return sorted(stats, key=lambda s: s.shard)


def _processes(pool: ProcessPoolExecutor) -> list[multiprocessing.process.BaseProcess]:
    # The executor lists its processes only in a private attribute (Python 3.14 adds terminate_workers()).
    return list((getattr(pool, "_processes", None) or {}).values())


def _exit_status(pool: ProcessPoolExecutor) -> str:
    """How the dead worker ended, as far as can be told: the pool stops the others with SIGTERM itself.

    Only once the pool has joined them: a fork server's child reports its exit status once, to whichever
    thread reads it first, and the pool's own thread is reading it while it stops the others."""
    processes = _processes(pool)
    pool.shutdown(wait=True)
    codes = sorted({p.exitcode for p in processes if p.exitcode not in (None, 0)},
                   key=lambda c: c == -signal.SIGTERM)
    if not codes:
        return ""
    if codes[0] >= 0:
        return f" (exit code {codes[0]})"
    try:
        return f" (killed by {signal.Signals(-codes[0]).name})"
    except ValueError:
        return f" (killed by signal {-codes[0]})"


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """The parent is failing (an interrupt, a shard that would not join): stop the workers rather than wait."""
    for proc in _processes(pool):
        proc.terminate()  # not is_alive(): that would read the exit status the pool's thread waits for
