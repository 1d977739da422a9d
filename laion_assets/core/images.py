"""The download stage's runner: a URL list -> webdataset tar shards laid out as img2dataset writes them.

For each shard `{shard:05d}`: `.tar` with `{key}.jpg` (or webp/png), `{key}.txt` and `{key}.json` for each
successful sample; `.parquet` with one row per input URL whatever happened to it; `_stats.json` written last,
which marks the shard complete. A rerun skips complete shards and rewrites incomplete ones whole, so nothing
is lost or duplicated. Samples inside a shard are written in key order, so a rerun gives the same files.

Each process runs one asyncio loop over its shards' URLs as one stream (no stall at shard ends), with
decode/resize/encode in a thread pool (Pillow releases the GIL) and shard writing in another thread.
"""

from __future__ import annotations

import asyncio
import io
import math
import multiprocessing
import os
import queue
import tarfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage

STATUSES = ("success", "failed_to_download", "failed_to_resize", "skipped_by_policy")

ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("http_status", pa.int32()),
    ("final_url", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("language", pa.string()),
    ("bytes_downloaded", pa.int64()),
])

WORKER_MODULES = ("laion_assets.core.images", "laion_assets.core.fetch", "laion_assets.core.resize")
ProgressFn = Callable[[int, int], None]  # (samples done since last call, of which successes)


@dataclass(frozen=True)
class Inputs:
    """The input columns as Arrow (compact); Python strings are made one shard at a time."""

    table: pa.Table  # url, caption, language

    def rows(self, lo: int, hi: int) -> list[tuple[str | None, str | None, str | None]]:
        part = self.table.slice(lo, hi - lo)
        return list(zip(*(part[c].to_pylist() for c in ("url", "caption", "language")), strict=True))


@dataclass
class ShardStats:
    shard: int
    count: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    bytes_downloaded: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> ShardStats:
        return cls(**orjson.loads(data))


@dataclass
class DownloadReport:
    shards: int = 0
    shards_skipped: int = 0
    rows: int = 0  # rows processed in this run
    statuses: Counter[str] = field(default_factory=Counter)  # all shards, skipped ones included
    errors: Counter[str] = field(default_factory=Counter)
    bytes_downloaded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

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
        parts = ", ".join(f"{s} {self.statuses[s]}" for s in STATUSES)
        return (f"{self.total} URLs in {self.shards} shards ({self.shards_skipped} already complete): {parts};"
                f" {self.rows} processed in {self.seconds:.1f} s ({rate:.0f}/s)")

    def metadata(self) -> dict[str, Any]:
        return {
            "urls": self.total,
            "success_rate": round(self.success_rate, 4),
            **{s: self.statuses[s] for s in STATUSES},
            "shards": self.shards,
            "shards_already_complete": self.shards_skipped,
            "processed_this_run": self.rows,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.rows / self.seconds, 1) if self.seconds else 0.0,
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_written": self.bytes_written,
            "error_histogram": dict(self.errors.most_common(20)),
        }


# --- layout -----------------------------------------------------------------------------------------

def shard_plan(rows: int, samples_per_shard: int) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) for each shard, in order."""
    return [(s, lo, min(lo + samples_per_shard, rows))
            for s, lo in enumerate(range(0, rows, samples_per_shard))]


def key_widths(rows: int, samples_per_shard: int) -> tuple[int, int]:
    """Digits of the shard and sample parts of a key, as img2dataset chooses them."""
    shards = max(1, math.ceil(rows / samples_per_shard))
    return max(5, math.ceil(math.log10(shards + 1))), max(1, math.ceil(math.log10(samples_per_shard)))


def shard_name(shard: int, width: int = 5) -> str:
    return f"{shard:0{width}d}"


def complete_shards(store: Storage, prefix: str) -> dict[int, str]:
    """Shards whose `_stats.json` exists: shard -> key of that file."""
    found = {}
    base = _join(prefix, "")
    for key in store.list(prefix):
        name = key[len(base):]
        if name.endswith("_stats.json") and name[: -len("_stats.json")].isdigit():
            found[int(name[: -len("_stats.json")])] = key
    return found


def _open_url_list(path: str, url_col: str) -> pq.ParquetFile:
    """A Parquet URL list, opened (footer only); a clear error when the URL column is missing."""
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if url_col not in names:
        raise ValueError(f"{path} has no column {url_col!r} (columns: {', '.join(names)})")
    return file


def count_rows(path: str, url_col: str = "url") -> int:
    """Rows of a Parquet URL list, from its footer."""
    return _open_url_list(path, url_col).metadata.num_rows


def read_inputs(path: str, url_col: str = "url", caption_col: str = "caption",
                language_col: str = "language") -> Inputs:
    """The input columns of a Parquet URL list; missing caption/language columns read as empty."""
    file = _open_url_list(path, url_col)
    names = file.schema_arrow.names
    wanted = list(dict.fromkeys(c for c in (url_col, caption_col, language_col) if c in names))
    table = file.read(columns=wanted)

    def column(name: str) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(table.num_rows, pa.string())
        return table[name].cast(pa.string())

    return Inputs(pa.table({"url": column(url_col), "caption": column(caption_col),
                            "language": column(language_col)}))


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


# --- one shard --------------------------------------------------------------------------------------

class ShardBuilder:
    """Collects one shard's results in any order; writes the shard in key order once all are in."""

    def __init__(self, shard: int, lo: int, hi: int, widths: tuple[int, int], staging: str) -> None:
        self.shard, self.lo = shard, lo
        self.widths = widths
        self.name = shard_name(shard, widths[0])
        self.rows: list[dict[str, Any] | None] = [None] * (hi - lo)
        # per sample: (tar field, spill offset, length) of its image files
        self.images: list[list[tuple[str, int, int]]] = [[] for _ in range(hi - lo)]
        self.pending = hi - lo
        self.started = time.perf_counter()
        self.staging = staging
        self.spill_path = os.path.join(staging, f"{self.name}.spill")
        self._spill = open(self.spill_path, "wb")  # noqa: SIM115 - closed in write()
        self._offset = 0

    def key(self, index: int) -> str:
        return f"{self.shard:0{self.widths[0]}d}{index - self.lo:0{self.widths[1]}d}"

    def add(self, index: int, row: dict[str, Any], files: dict[str, bytes]) -> bool:
        """Record a result and its image files (tar field -> bytes); True when it was the shard's last."""
        for name, data in files.items():
            self._spill.write(data)
            self.images[index - self.lo].append((name, self._offset, len(data)))
            self._offset += len(data)
        self.rows[index - self.lo] = row
        self.pending -= 1
        return self.pending == 0

    def write(self, store: Storage, prefix: str) -> ShardStats:
        """Commit tar, then parquet, then the stats marker."""
        self._spill.close()
        rows = [r for r in self.rows if r is not None]
        stats = ShardStats(shard=self.shard, count=len(rows))
        stats.statuses = dict(Counter(r["status"] for r in rows))
        stats.errors = dict(Counter(r["error_message"] for r in rows if r["error_message"]))
        stats.bytes_downloaded = sum(r["bytes_downloaded"] or 0 for r in rows)
        tar_path = os.path.join(self.staging, f"{self.name}.tar")
        with open(self.spill_path, "rb") as spill:

            def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
                for row, files in zip(rows, self.images, strict=True):
                    if not files:
                        continue
                    members = {"txt": (row["caption"] or "").encode("utf-8"), "json": orjson.dumps(row)}
                    for name, offset, length in files:
                        spill.seek(offset)
                        members[name] = spill.read(length)
                    yield row["key"], members

            write_tar(tar_path, samples())
        stats.bytes_written = os.path.getsize(tar_path)
        store.put_file(tar_path, _join(prefix, f"{self.name}.tar"))
        pq_path = os.path.join(self.staging, f"{self.name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), pq_path, compression="zstd")
        store.put_file(pq_path, _join(prefix, f"{self.name}.parquet"))
        os.unlink(self.spill_path)
        stats.duration_s = round(time.perf_counter() - self.started, 3)
        store.write_bytes(_join(prefix, f"{self.name}_stats.json"), stats.to_json())
        return stats

def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar: members `{key}.{field}` with fields sorted and a fixed owner, as webdataset's
    TarWriter lays them out, written through tarfile directly (a third faster than TarWriter's streamed
    mode) with mtime 0, so that the same samples always give the same bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for name in sorted(members):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(members[name]), 0, 0o444
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(members[name]))


def _row(key: str, url: str | None, caption: str | None, language: str | None) -> dict[str, Any]:
    return {"key": key, "url": url, "caption": caption, "status": "failed_to_download", "error_message": None,
            "http_status": None, "final_url": None, "width": None, "height": None, "original_width": None,
            "original_height": None, "sha256": None, "phash": None, "language": language or "",
            "bytes_downloaded": 0}


async def download_shards(
    plan: list[tuple[int, int, int]], inputs: Inputs, widths: tuple[int, int], settings: DownloadSettings,
    store: Storage, prefix: str, staging: str, progress: ProgressFn | None = None,
) -> list[ShardStats]:
    """Download the planned shards in this process; one stream of URLs, shards committed as they fill."""
    # Imported here: the parent of worker processes never needs aiohttp or Pillow, and starts them sooner.
    from laion_assets.core.fetch import Fetcher
    from laion_assets.core.resize import ImageError, process_image
    loop = asyncio.get_running_loop()
    resize_pool = ThreadPoolExecutor(settings.resize_threads, thread_name_prefix="resize")
    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    slots = asyncio.Semaphore(settings.in_flight)
    ext = settings.resize.encode_format
    results: list[ShardStats] = []
    writes: list[asyncio.Future[ShardStats]] = []
    tasks: set[asyncio.Task[None]] = set()
    done = ok = 0
    last_report = time.monotonic()

    def report(force: bool = False) -> None:
        nonlocal done, ok, last_report
        if progress and (force or time.monotonic() - last_report > 0.5) and done:
            progress(done, ok)
            done = ok = 0
            last_report = time.monotonic()

    async def one(fetcher: Any, builder: ShardBuilder, index: int, url: str | None, caption: str | None,
                  language: str | None) -> None:
        nonlocal done, ok
        row = _row(builder.key(index), url, caption, language)
        files: dict[str, bytes] = {}
        try:
            if not url:
                row["error_message"] = "no URL"
            else:
                fetched = await fetcher.fetch(url)
                row.update(status=fetched.status, error_message=fetched.error or None,
                           http_status=fetched.http_status, final_url=fetched.final_url,
                           bytes_downloaded=len(fetched.body))
                if fetched.status == "success":
                    try:
                        p = await loop.run_in_executor(resize_pool, process_image, fetched.body, settings.resize)
                    except ImageError as err:
                        row.update(status="failed_to_resize", error_message=str(err))
                    except Exception as err:  # noqa: BLE001 - a decoder bug costs one row, not the run
                        row.update(status="failed_to_resize", error_message=f"{type(err).__name__}: {err}")
                    else:
                        files[ext] = p.data
                        if p.original is not None:
                            files[f"original.{_extension(p.original)}"] = p.original
                        row.update(width=p.width, height=p.height, original_width=p.original_width,
                                   original_height=p.original_height, sha256=p.sha256, phash=p.phash)
        except Exception as err:  # noqa: BLE001 - the fetcher never raises; this guards against our own bugs
            row.update(status="failed_to_download", error_message=f"{type(err).__name__}: {err}", final_url=None)
            files = {}
        finally:
            slots.release()
        if builder.add(index, row, files):
            writes.append(loop.run_in_executor(writer_pool, builder.write, store, prefix))
        done += 1
        ok += row["status"] == "success"
        report()

    try:
        async with Fetcher(settings.fetch) as fetcher:
            for shard, lo, hi in plan:
                builder = ShardBuilder(shard, lo, hi, widths, staging)
                for index, (url, caption, language) in enumerate(inputs.rows(lo, hi), start=lo):
                    await slots.acquire()
                    task = asyncio.create_task(one(fetcher, builder, index, url, caption, language))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
        for fut in writes:
            results.append(await fut)
        report(force=True)
    finally:
        for task in tasks:
            task.cancel()
        resize_pool.shutdown(wait=False, cancel_futures=True)
        writer_pool.shutdown(wait=True)
    return results


def _extension(data: bytes) -> str:
    from laion_assets.core.resize import sniff

    fmt = (sniff(data) or "bin").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


# --- processes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    input_path: str
    url_col: str
    caption_col: str
    language_col: str
    plan: list[tuple[int, int, int]]
    widths: tuple[int, int]
    settings: DownloadSettings
    store_root: str
    prefix: str
    endpoint_url: str | None


def _worker(job: _Job, messages: Any) -> None:
    """A worker process: downloads its shards and reports progress and results on the queue."""
    try:
        store = Storage(job.store_root, _s3_client(job.store_root, job.endpoint_url))
        inputs = read_inputs(job.input_path, job.url_col, job.caption_col, job.language_col)
        with store.staging_dir() as staging:
            stats = asyncio.run(download_shards(
                job.plan, inputs, job.widths, job.settings, store, job.prefix, staging,
                lambda n, k: messages.put(("progress", n, k)),
            ))
        messages.put(("done", [s.__dict__ for s in stats]))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        messages.put(("error", traceback.format_exc()))


def _s3_client(root: str, endpoint_url: str | None) -> Any:
    if not root.startswith("s3://"):
        return None
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def download(
    input_path: str, store: Storage, prefix: str, settings: DownloadSettings, *, url_col: str = "url",
    caption_col: str = "caption", language_col: str = "language", progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> DownloadReport:
    """Download every URL of a local Parquet file into shards under `prefix` of `store`; resumable."""
    start = time.perf_counter()
    rows = count_rows(input_path, url_col)
    plan = shard_plan(rows, settings.samples_per_shard)
    widths = key_widths(rows, settings.samples_per_shard)
    report = DownloadReport(shards=len(plan))
    store.remove_stale_temporaries(prefix)
    done_before = complete_shards(store, prefix)
    for shard in sorted(done_before):
        if shard < len(plan):
            report.add(ShardStats.from_json(store.read_bytes(done_before[shard])))
    todo = [p for p in plan if p[0] not in done_before]
    report.shards_skipped = len(plan) - len(todo)
    if log:
        log(f"{rows} URLs in {len(plan)} shards; {report.shards_skipped} already complete, {len(todo)} to do")
    processes = max(1, min(settings.processes or (os.cpu_count() or 1), len(todo)))
    if todo and processes == 1:
        inputs = read_inputs(input_path, url_col, caption_col, language_col)
        with store.staging_dir() as staging:
            stats = asyncio.run(download_shards(todo, inputs, widths, settings, store, prefix, staging, progress))
    elif todo:
        stats = _run_processes(input_path, url_col, caption_col, language_col, todo, widths, settings, store,
                               prefix, processes, progress)
    else:
        stats = []
    for s in stats:
        report.add(s)
        report.rows += s.count
    report.seconds = time.perf_counter() - start
    return report


def _run_processes(
    input_path: str, url_col: str, caption_col: str, language_col: str, todo: list[tuple[int, int, int]],
    widths: tuple[int, int], settings: DownloadSettings, store: Storage, prefix: str, processes: int,
    progress: ProgressFn | None,
) -> list[ShardStats]:
    # Not fork: the parent may run threads (Dagster, boto3) that a fork would copy mid-lock. A fork server
    # is a clean single-threaded process that imports the stage once and forks workers from it in
    # milliseconds (spawn re-imports everything per worker, the CLI's __main__ included).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_MODULES))
    messages = ctx.Queue()
    endpoint = getattr(getattr(store.s3, "meta", None), "endpoint_url", None) if store.is_s3 else None
    workers = []
    for p in range(processes):
        job = _Job(input_path, url_col, caption_col, language_col, todo[p::processes], widths, settings,
                   store.root, prefix, endpoint)
        proc = ctx.Process(target=_worker, args=(job, messages), daemon=True)
        proc.start()
        workers.append(proc)
    stats: list[ShardStats] = []
    finished = 0
    errors: list[str] = []
    try:
        while finished < processes:
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
                stats.extend(ShardStats(**s) for s in msg[1])
                finished += 1
            else:
                errors.append(msg[1])
                finished += 1
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    if errors:
        raise RuntimeError(f"{len(errors)} download worker(s) failed:\n{errors[0]}")
    return sorted(stats, key=lambda s: s.shard)


__all__ = ["DownloadReport", "DownloadSettings", "ShardStats", "download", "shard_plan", "write_tar"]
