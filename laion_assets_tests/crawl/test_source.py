"""Reading crawl files from a remote source: how often a file is tried, and resuming a cut download."""

from __future__ import annotations

import http.server
import threading

import pytest

from laion_assets.core.crawl.source import WatFetchError, fetched, s3_client_for
from laion_assets.core.settings import SourceSettings

BODY = bytes(range(256)) * 400  # 100 KiB, so that a cut leaves a part on each side


def test_an_http_file_answering_503_is_tried_exactly_retries_plus_one_times(loopback):
    loopback.static("/wat.gz", b"", status=503)
    url = f"{loopback.base}/wat.gz"
    with pytest.raises(WatFetchError, match="failed after 4 attempts: HTTP Error 503"), \
            fetched(url, SourceSettings(retries=3, backoff_s=0)):
        pass
    assert loopback.hits["/wat.gz"] == 4


def test_a_cut_http_download_resumes_with_a_range_request(loopback):
    half = len(BODY) // 2
    ranges: list[str | None] = []

    def cut_then_rest(h: http.server.BaseHTTPRequestHandler) -> None:
        ranges.append(h.headers.get("Range"))
        if len(ranges) == 1:
            h.send_response(200)
            h.send_header("Content-Length", str(len(BODY)))
            h.end_headers()
            h.wfile.write(BODY[:half])
            h.close_connection = True  # the connection drops mid-body
            return
        start = int(h.headers["Range"].removeprefix("bytes=").removesuffix("-"))
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        h.send_header("Content-Length", str(len(BODY) - start))
        h.end_headers()
        h.wfile.write(BODY[start:])

    loopback.routes["/wat.gz"] = cut_then_rest
    with fetched(f"{loopback.base}/wat.gz", SourceSettings(retries=1, backoff_s=0)) as path, open(path, "rb") as fh:
        assert fh.read() == BODY
    assert ranges == [None, f"bytes={half}-"]


def test_the_s3_client_of_a_source_retries_as_its_settings_say():
    assert s3_client_for(SourceSettings(retries=7)).meta.config.retries == {"total_max_attempts": 8,
                                                                           "mode": "standard"}


@pytest.fixture
def unavailable_s3(monkeypatch):
    """An "S3 endpoint" answering 503 to every request; yields the list of requests it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer  # noqa: N815 (the stdlib's names)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield seen
    server.shutdown()
    server.server_close()


def test_an_s3_file_is_retried_by_botocore_alone(unavailable_s3):
    # retries=1 keeps botocore's jittered backoff (up to 1 s before its one retry) short.
    with pytest.raises(WatFetchError, match="503"), \
            fetched("s3://commoncrawl/crawl-data/x.warc.wat.gz", SourceSettings(retries=1)):
        pass
    assert len(unavailable_s3) == 2, unavailable_s3  # not 2 x botocore's 5, nor x s3transfer's


def test_a_source_answering_503_with_retry_after_to_every_third_request_is_slowed_down_not_failed(loopback):
    """Common Crawl's "Slow Down": the listing and every WAT file still arrive, with no retry used up, each request
    kept to the source's rate, and the Retry-After waited out by the next request whoever makes it."""
    import gzip
    import time

    from laion_assets.core.crawl.source import RATES, read_listing

    times: list[float] = []
    files = {f"/crawl-data/CC-MAIN-2099-01/wat/{i}.warc.wat.gz": BODY[i:] for i in range(5)}
    listing = gzip.compress("\n".join(p.lstrip("/") for p in files).encode())

    def every_third(body: bytes):
        def handler(h: http.server.BaseHTTPRequestHandler) -> None:
            times.append(time.monotonic())
            if len(times) % 3 == 0:
                h.send_response(503)
                h.send_header("Retry-After", "0.3")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        return handler

    loopback.routes["/crawl-data/CC-MAIN-2099-01/wat.paths.gz"] = every_third(listing)
    for path, body in files.items():
        loopback.routes[path] = every_third(body)
    settings = SourceSettings(base=loopback.base, retries=0, backoff_s=0, requests_per_s=20)
    paths = read_listing("CC-MAIN-2099-01", settings)
    got = []
    for rel in paths:
        with fetched(f"{loopback.base}/{rel}", settings) as local, open(local, "rb") as fh:
            got.append(fh.read())
    assert got == list(files.values())  # retries=0, and nothing failed
    assert len(times) == 8  # 6 files; the 3rd and 6th requests were answered 503
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.04  # 20 requests/s at most (a little under 0.05 s for the clock's grain)
    assert all(gaps[i] >= 0.28 for i in (2, 5))  # the request after each 503 waited its Retry-After
    assert RATES.gap(loopback.base, 0.05) > 0.05  # slowed down, recovering with each success


def test_a_retry_after_beyond_the_budget_uses_the_retries(loopback):
    loopback.routes["/wat.gz"] = lambda h: (h.send_response(429), h.send_header("Retry-After", "60"),
                                            h.send_header("Content-Length", "0"), h.end_headers())
    settings = SourceSettings(retries=1, backoff_s=0, throttle_budget_s=1, requests_per_s=0)
    with pytest.raises(WatFetchError, match="failed after 2 attempts: HTTP Error 429"), \
            fetched(f"{loopback.base}/wat.gz", settings):
        pass
