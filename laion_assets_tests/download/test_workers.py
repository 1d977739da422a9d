"""Download worker processes that fail: one that dies (killed, or exiting without a word) fails the download
with an error saying so, one that raises fails it with its traceback, and no worker is left running."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_assets.core.download.distributor import run as download
from laion_assets.core.settings import DownloadSettings, FetchSettings, ResizeSettings
from laion_assets.core.storage import LocalStorage, Storage
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render

# min_image_bytes 0: the images are small (about 4 KB).
SETTINGS = DownloadSettings(samples_per_shard=2, processes=2, min_image_bytes=0, resize=ResizeSettings(image_size=64),
                            fetch=FetchSettings(allow_networks=("127.0.0.1/32",), deadline_s=5.0))


class FailingStorage(LocalStorage):
    """Local storage that fails in a worker process when it commits a shard file; the parent's calls work.
    Pickled to the workers by reference to this module, which they import."""

    def __new__(cls, root: str, how: str, parent: int | None = None) -> FailingStorage:
        return object.__new__(cls)  # Storage.__new__ picks a backend from the root alone

    def __init__(self, root: str, how: str, parent: int | None = None) -> None:
        super().__init__(root)
        self.how, self.parent = how, parent or os.getpid()

    def __reduce__(self):
        return FailingStorage, (self.root, self.how, self.parent)

    def put_file(self, local_path: str, key: str) -> None:
        if os.getpid() != self.parent:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "exit":
                os._exit(3)
            raise OSError("no space left on the test's device")
        super().put_file(local_path, key)


def url_list(loopback, path, count: int = 8) -> str:
    for i in range(count):
        loopback.static(f"/{i}.jpg", jpeg_bytes(render(Scene("star", "red", "white", "top"), (200, 150), seed=i)))
    pq.write_table(pa.table({"url": [f"{loopback.base}/{i}.jpg" for i in range(count)]}), path)
    return str(path)


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize(("how", "message"), [("sigkill", r"killed by SIGKILL"), ("exit", r"exit code 3")])
def test_a_worker_that_dies_fails_the_download_and_leaves_no_process(loopback, tmp_path, how, message):
    urls = url_list(loopback, tmp_path / "urls.parquet")
    # A download that works first, so that the fork server and the resource tracker (which outlive a download
    # by design) are already running and only the workers themselves are new.
    assert download(urls, Storage(str(tmp_path / "ok")), "", SETTINGS).statuses["success"] == 8
    before = descendants()
    with pytest.raises(BrokenProcessPool, match=rf"a download worker process died \({message}\)"):
        download(urls, FailingStorage(str(tmp_path / "dies"), how), "", SETTINGS)
    assert descendants() <= before
    assert not (tmp_path / "dies" / "_manifest.json").exists()


def after(seconds: float, body: bytes):
    def handler(h) -> None:
        time.sleep(seconds)
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        with contextlib.suppress(OSError):
            h.wfile.write(body)
    return handler


def test_a_parent_that_fails_stops_its_workers_at_once(loopback, tmp_path):
    # Each shard: an image that takes a second (its progress reaches the parent, whose callback raises), then
    # one that takes a minute; the download must not wait for it.
    image = jpeg_bytes(render(Scene("star", "red", "white", "top"), (200, 150), seed=0))
    loopback.routes["/soon.jpg"] = after(1.0, image)
    loopback.routes["/late.jpg"] = after(60.0, image)
    urls = tmp_path / "slow.parquet"
    pq.write_table(pa.table({"url": [f"{loopback.base}/soon.jpg?{i}" if i % 2 == 0 else f"{loopback.base}/late.jpg?{i}"
                                     for i in range(8)]}), urls)
    warm_up = url_list(loopback, tmp_path / "urls.parquet", 2)  # the fork server running, as above
    assert download(warm_up, Storage(str(tmp_path / "ok")), "", SETTINGS).statuses["success"] == 2
    before = descendants()

    def progress(done: int, ok: int) -> None:
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        download(str(urls), Storage(str(tmp_path / "stopped")), "", dataclasses.replace(
            SETTINGS, fetch=dataclasses.replace(SETTINGS.fetch, deadline_s=120.0)), progress=progress)
    assert time.monotonic() - start < 30
    assert descendants() <= before


def test_an_exception_in_a_worker_fails_the_download_with_its_traceback(loopback, tmp_path):
    urls = url_list(loopback, tmp_path / "urls.parquet")
    with pytest.raises(RuntimeError, match=r"download worker\(s\) failed") as failed:
        download(urls, FailingStorage(str(tmp_path / "raises"), "raise"), "", SETTINGS)
    text = str(failed.value)
    assert "Traceback (most recent call last)" in text and "in put_file" in text
    assert "OSError: no space left on the test's device" in text
    assert not (tmp_path / "raises" / "_manifest.json").exists()


FORK_SERVER_BLAS = """
import ctypes, json, os
from concurrent.futures import ProcessPoolExecutor
from laion_assets.core.download import forkserver
from laion_assets.core.settings import DownloadSettings

def blas_threads():
    # The threads OpenBLAS was set up with as it loaded, in the fork server: a worker inherits its state.
    import numpy  # loaded by the server's preload already
    paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads64_"):
            if hasattr(lib, name):
                return getattr(lib, name)(), os.environ.get("OPENBLAS_NUM_THREADS")
    return None, os.environ.get("OPENBLAS_NUM_THREADS")

if __name__ == "__main__":
    ctx = forkserver.start(DownloadSettings(processes=2))
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        threads, env = pool.submit(blas_threads).result()
    print(json.dumps({"threads": threads, "env": env, "here": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def test_the_fork_server_loads_blas_single_threaded(tmp_path):
    """numpy's OpenBLAS would start a busy-waiting thread per further core in the fork server as it loads (numpy
    comes with pyarrow): the server sets itself single-threaded first, and its workers inherit that; the process
    that started it is left as it was."""
    script = tmp_path / "fork_server_blas.py"
    script.write_text(FORK_SERVER_BLAS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if seen["threads"] is None:
        pytest.skip("numpy here is not built on OpenBLAS")
    assert seen == {"threads": 1, "env": "1", "here": None}
