"""One process's share of a download: one asyncio loop over its URLs as a single stream (no stall at shard
ends), with decode/resize/encode in a thread pool (Pillow releases the GIL) and shard writing in another thread.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from laion_assets.core.download.plan import Plan, ShardPlan
from laion_assets.core.download.reader import Inputs
from laion_assets.core.download.report import PAGE_OPT_OUT, ShardStats
from laion_assets.core.download.robots import page_opt_out
from laion_assets.core.download.writer import Piece, PieceBuilder, new_row, write_shard
from laion_assets.core.progress import Throttle
from laion_assets.core.settings import DownloadSettings
from laion_assets.core.storage import Storage

ProgressFn = Callable[[int, int], None]  # (samples done since the last call, of which successes)


@dataclass(frozen=True)
class WorkItem:
    """Rows [lo, hi) of one shard: the whole shard, or a piece of it when shards are fewer than processes."""

    shard: ShardPlan
    lo: int
    hi: int


@dataclass
class RunResult:
    shards: list[ShardStats] = field(default_factory=list)  # shards written whole by this process
    pieces: list[Piece] = field(default_factory=list)  # pieces of shards split between processes


class Progress:
    """Counts finished URLs and hands them to a callback at most every `every_s` seconds (from a worker process the
    callback crosses a queue: one message per URL would cost more than the URL)."""

    def __init__(self, callback: ProgressFn | None, every_s: float = 0.5) -> None:
        self.callback, self.throttle = callback, Throttle(every_s)
        self.done = self.ok = 0

    def add(self, success: bool) -> None:
        self.done += 1
        self.ok += success
        if self.throttle.due():
            self.flush()

    def flush(self) -> None:
        if self.callback and self.done:
            self.callback(self.done, self.ok)
        self.done = self.ok = 0


def _extension(data: bytes) -> str:
    from laion_assets.core.download.resize import sniff

    fmt = (sniff(data) or "bin").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


class ShardRunner:
    """Downloads work items in this process; whole shards are committed as they fill, pieces are returned."""

    def __init__(self, inputs: Inputs, plan: Plan, settings: DownloadSettings, store: Storage, prefix: str,
                 staging: str, progress: ProgressFn | None = None) -> None:
        self.inputs, self.plan, self.settings = inputs, plan, settings
        self.store, self.prefix, self.staging = store, prefix, staging
        self.progress = Progress(progress)
        self._saved = settings.saved_columns()
        self._verify = settings.verify()
        self._page_refusals: dict[int, str] | None = None

    async def run(self, work: list[WorkItem]) -> RunResult:
        # Imported here: the parent of worker processes never needs aiohttp or Pillow, and starts them sooner.
        from laion_assets.core.download.fetch import Fetcher

        self._loop = asyncio.get_running_loop()
        self._resize_pool = ThreadPoolExecutor(self.settings.resize_threads, thread_name_prefix="resize")
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._slots = asyncio.Semaphore(self.settings.in_flight)
        self._writes: list[asyncio.Future[ShardStats]] = []
        self._result = RunResult()
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with Fetcher(self.settings.fetch) as fetcher:
                for item in work:
                    builder = PieceBuilder(item.shard, item.lo, item.hi, self.staging)
                    extras = self.inputs.extras(item.lo, item.hi)
                    for index, (url, caption, language) in enumerate(self.inputs.rows(item.lo, item.hi), start=item.lo):
                        await self._slots.acquire()
                        task = asyncio.create_task(self._one(fetcher, builder, index, url, caption, language,
                                                             extras[index - item.lo]))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            for fut in self._writes:
                self._result.shards.append(await fut)
            self.progress.flush()
        finally:
            for task in tasks:
                task.cancel()
            self._resize_pool.shutdown(wait=False, cancel_futures=True)
            self._writer_pool.shutdown(wait=True)
        return self._result

    async def _one(self, fetcher: Any, builder: PieceBuilder, index: int, url: str | None, caption: str | None,
                   language: str | None, extra: dict[str, Any] | None = None) -> None:
        extra = extra or {}
        row = self._new_row(builder.shard.key(index, self.plan.widths), url, caption, language, extra)
        try:
            files = await self._process(fetcher, index, url, row, extra)
        finally:
            self._slots.release()
        if builder.add(index, row, files):
            piece = builder.finish()
            if builder.whole:
                self._writes.append(self._loop.run_in_executor(
                    self._writer_pool, write_shard, [piece], self.store, self.prefix, self.plan.settings, self.staging,
                    self.plan.layout))
            else:
                self._result.pieces.append(piece)
        self.progress.add(row["status"] == "success")

    def _new_row(self, key: str, url: str | None, caption: str | None, language: str | None,
                 extra: dict[str, Any]) -> dict[str, Any]:
        """A URL's row before anything happened to it, with the columns the plan's layout adds."""
        row = new_row(key, url, caption, language)
        if self.plan.layout is not None:
            self._layout_columns(row, extra)
        return row

    def _layout_columns(self, row: dict[str, Any], extra: dict[str, Any]) -> None:
        """The columns a layout adds, empty until the image succeeds; the saved input columns as they are."""
        layout = self.plan.layout
        if layout.hash_col:
            row[layout.hash_col] = None
        if layout.exif:
            row["exif"] = None
        for name in self._saved:
            row[name] = extra.get(name)

    def _refused_before_decoding(self, body: bytes, row: dict[str, Any], extra: dict[str, Any]) -> bool:
        """min_image_bytes and verify_hash: a row status without decoding anything."""
        if len(body) < self.settings.min_image_bytes:
            limit = self.settings.min_image_bytes
            row.update(status="failed_to_resize", error_message=f"under min_image_bytes ({limit})")
            return True
        if self._verify is not None:
            col, algo = self._verify
            expected = extra.get(col)
            found = hashlib.new(algo, body).hexdigest()
            if expected is None or str(expected).strip().lower() != found:
                row.update(status="hash_mismatch", error_message=f"hash mismatch: {col} expected {algo} {expected}, "
                                                                 f"found {found}")
                return True
        return False

    async def _process(self, fetcher: Any, index: int, url: str | None, row: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> dict[str, bytes]:
        """A row's sample files: none when its page opted out, else fetched and resized; `row` updated either way."""
        try:
            refusal = self.page_refusal(index)
            if refusal:
                row.update(status="skipped_by_policy", error_message=refusal)
                return {}
            return await self._fetch_and_resize(fetcher, url, row, extra)
        except Exception as err:  # noqa: BLE001 - the fetcher never raises; this guards against our own bugs
            row.update(status="failed_to_download", error_message=f"{type(err).__name__}: {err}", final_url=None)
            return {}

    def page_refusal(self, index: int) -> str | None:
        """Why the page that links input row `index` forbids AI use of its images (noai, noimageai), or None."""
        fetch = self.settings.fetch
        if not fetch.respect_page_opt_out:
            return None
        if self._page_refusals is None:
            self._page_refusals = {}
            for i, (page, directives) in self.inputs.opted_out_pages().items():
                directive = page_opt_out(directives, fetch.agent_token)
                if directive:
                    page = page or "(unknown)"
                    self._page_refusals[i] = f"{PAGE_OPT_OUT}: page {page} opted out of AI use: {directive}"
        return self._page_refusals.get(index)

    async def _fetch_and_resize(self, fetcher: Any, url: str | None, row: dict[str, Any],
                                extra: dict[str, Any] | None = None) -> dict[str, bytes]:
        """Fill the row with what happened; the sample's files (tar field -> bytes) when it succeeded."""
        from laion_assets.core.download.resize import ImageError, process_image

        if not url:
            row["error_message"] = "no URL"
            return {}
        fetched = await fetcher.fetch(url)
        row.update(status=fetched.status, error_message=fetched.error or None, http_status=fetched.http_status,
                   final_url=fetched.final_url, bytes_downloaded=len(fetched.body),
                   attempts=row["attempts"] + fetched.attempts)
        if fetched.status != "success":
            return {}
        extra = extra or {}
        if self._refused_before_decoding(fetched.body, row, extra):
            return {}
        resize = self.settings.resize
        boxes = extra.get(self.settings.bbox_col) if self.settings.bbox_col else None
        work = functools.partial(process_image, boxes=boxes) if boxes else process_image
        try:
            p = await self._loop.run_in_executor(self._resize_pool, work, fetched.body, resize)
        except ImageError as err:
            row.update(status="failed_to_resize", error_message=str(err))
            return {}
        except Exception as err:  # noqa: BLE001 - a decoder bug costs one row, not the run
            row.update(status="failed_to_resize", error_message=f"{type(err).__name__}: {err}")
            return {}
        row.update(width=p.width, height=p.height, original_width=p.original_width,
                   original_height=p.original_height, sha256=p.sha256, phash=p.phash)
        layout = self.plan.layout
        if layout is not None and layout.hash_col:
            row[layout.hash_col] = hashlib.new(layout.hash_col, fetched.body).hexdigest()
        if layout is not None and layout.exif:
            from laion_assets.core.download.resize import exif_json

            row["exif"] = await self._loop.run_in_executor(self._resize_pool, exif_json, fetched.body)
        files = {resize.encode_format: p.data}
        if p.original is not None:
            files[f"original.{_extension(p.original)}"] = p.original
        return files
