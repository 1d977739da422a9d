"""The fork server the download's worker processes are forked from (why a fork server: `distributor.py`).

It imports the modules workers need once, so that each worker starts with them loaded. Starting it is on the
critical path of a short download (its interpreter and imports take about half a second on a loaded core), so it
is started as early as a caller can: `distributor.run` does it first, and the CLI before it even imports the
stage (this module imports only the standard library and the settings, so that the fork server's imports run
beside the parent's own).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os

from laion_assets.core.settings import DownloadSettings

# First: it applies process_env.single_threaded_blas in the fork server before numpy (pyarrow imports it) loads.
WORKER_MODULES = ("laion_assets.core.download.worker_env", "laion_assets.core.download.runner",
                  "laion_assets.core.download.fetch", "laion_assets.core.download.resize")


def processes(settings: DownloadSettings) -> int:
    """How many worker processes a download with these settings uses at most (0 in the settings: one per core)."""
    return max(1, settings.processes or (os.cpu_count() or 1))


def worker_modules(settings: DownloadSettings) -> tuple[str, ...]:
    """What the fork server preloads. The shard writer builds its rows without pandas (`writer.rows_table`), but the
    parquet layout's image column goes through `pa.array`, which imports pandas on first use (a quarter of a second
    per worker, GIL held): preloaded only then."""
    return WORKER_MODULES + (("pandas",) if settings.output_format == "parquet" else ())


def start(settings: DownloadSettings, also: tuple[str, ...] = ()) -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server started with `worker_modules` and `also` preloaded (a no-op when it runs
    already: the first download's preload list stays; a worker imports anything else it needs itself).

    `also`: what the parent's main script imports. Every worker runs that script again as it starts (multiprocessing
    re-imports the parent's `__main__`; Python 3.11's fork server never preloads it, as its own preload of "__main__"
    looks for a key that get_preparation_data does not write), which costs nothing once its imports are loaded."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*worker_modules(settings), *also])
    multiprocessing.forkserver.ensure_running()
    return ctx
