"""The fetcher against servers this test starts on 127.0.0.1; nothing leaves the loopback range."""

from __future__ import annotations

import asyncio
import time

import pytest

from laion_assets.core.download.fetch import Fetcher, opt_out
from laion_assets.core.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets.core.settings import FetchSettings
from laion_assets_tests.handlers import cut_after, drip, endless, first_then, respond

JPEG = jpeg_bytes(render(Scene("square", "green", "white", "center"), (320, 240), seed=3))
FAST = dict(allow_networks=("127.0.0.1/32",), deadline_s=5.0, backoff_s=0.01, connect_timeout_s=2.0)


def fetch(url: str, **overrides) -> object:
    async def go():
        async with Fetcher(FetchSettings(**{**FAST, **overrides})) as f:
            return await f.fetch(url)

    return asyncio.run(go())


def test_success_and_404_is_not_retried(loopback):
    loopback.static("/a.jpg", JPEG, "image/jpeg")
    ok = fetch(f"{loopback.base}/a.jpg")
    assert ok.status == "success" and ok.body == JPEG and ok.http_status == 200
    missing = fetch(f"{loopback.base}/missing.jpg")
    assert missing.status == "failed_to_download" and missing.http_status == 404
    assert loopback.hits["/missing.jpg"] == 1


def test_500_then_success_on_retry(loopback):
    loopback.routes["/flaky.jpg"], _ = first_then(respond(500), respond(200, JPEG))
    r = fetch(f"{loopback.base}/flaky.jpg")
    assert r.status == "success" and r.attempts == 2


def test_429_honours_retry_after(loopback):
    loopback.routes["/busy.jpg"], calls = first_then(respond(429, headers={"Retry-After": "1"}), respond(200, JPEG))
    r = fetch(f"{loopback.base}/busy.jpg")
    assert r.status == "success" and calls[1] - calls[0] >= 0.9


def test_redirect_chain_of_six_is_refused_and_five_followed(loopback):
    for i in range(6):
        loopback.routes[f"/r{i}"] = respond(302, headers={"Location": f"/r{i + 1}"})
    loopback.static("/r6", JPEG)
    assert fetch(f"{loopback.base}/r1").status == "success"  # five redirects
    r = fetch(f"{loopback.base}/r0")
    assert r.status == "failed_to_download" and "redirects" in r.error


def test_forbidden_addresses_direct_and_by_redirect(loopback):
    loopback.routes["/evil"] = respond(302, headers={"Location": f"http://127.0.0.2:{loopback.port}/x.jpg"})
    r = fetch(f"{loopback.base}/evil")
    assert r.status == "failed_to_download" and "127.0.0.2" in r.error and "loopback" in r.error
    r = fetch(f"http://127.0.0.2:{loopback.port}/x.jpg")
    assert r.status == "failed_to_download" and "forbidden" in r.error
    r = fetch("http://169.254.169.254/latest/meta-data/")  # refused before any packet is sent
    assert r.status == "failed_to_download" and "link-local" in r.error
    assert loopback.hits.get("/x.jpg") is None
    # A host name resolving to a forbidden address is refused by the resolver, before connecting.
    r = fetch(f"http://localhost:{loopback.port}/y.jpg", allow_networks=())
    assert r.status == "failed_to_download" and "forbidden address" in r.error
    assert loopback.hits.get("/y.jpg") is None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://127.0.0.1/a"])
def test_non_http_schemes(url):
    r = fetch(url)
    assert r.status == "failed_to_download" and "not http(s)" in r.error


def test_slow_drip_exceeds_the_total_deadline(loopback):
    loopback.routes["/drip"] = drip
    start = time.monotonic()
    r = fetch(f"{loopback.base}/drip", deadline_s=1.0, retries=0)
    assert r.status == "failed_to_download" and "deadline" in r.error and time.monotonic() - start < 3


def test_endless_body_hits_the_byte_cap(loopback):
    loopback.routes["/endless"] = endless
    r = fetch(f"{loopback.base}/endless", max_bytes=1_000_000)
    assert r.status == "failed_to_download" and "cap" in r.error


def test_x_robots_tag_and_robots_txt(loopback):
    loopback.routes["/noai.jpg"] = respond(200, JPEG, {"X-Robots-Tag": "noai"})
    r = fetch(f"{loopback.base}/noai.jpg")
    assert r.status == "skipped_by_policy" and "noai" in r.error
    loopback.static("/robots.txt", b"User-agent: laion-assets\nDisallow: /private/\n", "text/plain")
    loopback.static("/private/a.jpg", JPEG)
    r = fetch(f"{loopback.base}/private/a.jpg")
    assert r.status == "skipped_by_policy" and "robots.txt" in r.error
    assert "/private/a.jpg" not in loopback.hits
    assert opt_out("otherbot: noai, noarchive", "laion-assets") is None
    assert opt_out("laion-assets: noimageai", "laion-assets") == "noimageai"


def test_connection_closed_mid_body(loopback):
    loopback.routes["/cut.jpg"] = cut_after(JPEG, 500)
    r = fetch(f"{loopback.base}/cut.jpg", retries=1)
    assert r.status == "failed_to_download" and r.attempts == 2 and r.error
