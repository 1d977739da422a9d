"""The fetcher against servers this test starts on 127.0.0.1; nothing leaves the loopback range."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from laion_assets.core.download.fetch import Fetcher, FetchResult, opt_out
from laion_assets.core.settings import FetchSettings
from laion_assets.offline.dns_server import LoopbackDns
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets_tests.conftest import LoopbackServer
from laion_assets_tests.handlers import Gauge, cut_after, drip, endless, first_then, redirect, respond, slow

JPEG = jpeg_bytes(render(Scene("square", "green", "white", "center"), (320, 240), seed=3))
FAST = dict(allow_networks=("127.0.0.1/32",), deadline_s=5.0, backoff_s=0.01, connect_timeout_s=2.0)


# One server per module, cleared for each test: closing one costs half a second (serve_forever polls that often),
# and every test here needs one. Each test makes its own Fetcher, so no policy cache outlives a test.
@pytest.fixture(scope="module")
def _servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    servers = LoopbackServer(), LoopbackServer()
    yield servers
    for server in servers:
        server.close()


@pytest.fixture
def loopback(_servers) -> LoopbackServer:
    for server in _servers:
        server.routes.clear()
        server.hits.clear()
    return _servers[0]


@pytest.fixture
def second(_servers, loopback) -> LoopbackServer:
    """Another host (another port) for tests that need two."""
    return _servers[1]


def fetch(url: str, **overrides) -> object:
    async def go():
        async with Fetcher(FetchSettings(**{**FAST, **overrides})) as f:
            return await f.fetch(url)

    return asyncio.run(go())


def fetch_together(urls: list[str], **overrides) -> list[FetchResult]:
    """The URLs all at once through one Fetcher, as the runner sends them."""
    async def go() -> list[FetchResult]:
        async with Fetcher(FetchSettings(**{**FAST, **overrides})) as f:
            return await asyncio.gather(*(f.fetch(url) for url in urls))

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


# --- retries ----------------------------------------------------------------------------------------------------

NO_POLICIES = dict(respect_robots_txt=False, respect_tdmrep=False)


@pytest.mark.parametrize("status", [408, 425, 429, 502, 503])
def test_transient_statuses_are_retried(loopback, status):
    loopback.routes["/t.jpg"], _ = first_then(respond(status), respond(200, JPEG))
    r = fetch(f"{loopback.base}/t.jpg")
    assert r.status == "success" and r.attempts == 2


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_other_4xx_are_not_retried(loopback, status):
    loopback.routes["/t.jpg"] = respond(status)
    r = fetch(f"{loopback.base}/t.jpg")
    assert r.status == "failed_to_download" and r.attempts == 1 and r.http_status == status


def test_read_timeout_is_retried(loopback):
    loopback.routes["/t.jpg"], _ = first_then(slow(respond(200, JPEG), 0.8), respond(200, JPEG))
    r = fetch(f"{loopback.base}/t.jpg", connect_timeout_s=0.3)
    assert r.status == "success" and r.attempts == 2


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_not_retried():
    # aiohttp's ClientConnectorError is a ClientOSError, which used to be retried as a "reset".
    r = fetch(f"http://127.0.0.1:{free_port()}/a.jpg", **NO_POLICIES)
    assert r.status == "failed_to_download" and r.attempts == 1 and "Cannot connect" in r.error


def test_refused_origin_fails_while_reading_robots_txt():
    # Not a policy: the site is down. No image request follows, and its row says so.
    r = fetch(f"http://127.0.0.1:{free_port()}/a.jpg")
    assert r.status == "failed_to_download" and r.attempts == 0
    assert "Cannot connect" in r.error and "robots.txt" in r.error


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    """A name server on 127.0.0.1 answering what the test puts in `records` (other names: NXDOMAIN)."""
    with LoopbackDns() as server:
        yield server


def test_dns_failure_is_not_retried(dns):
    # A generous hedge: on a loaded machine an answer slower than the default 1 s hedge brings a second query,
    # which is not the retry after NXDOMAIN this test is about.
    slow_hedge = dict(nameservers=(dns.address,), dns_timeout_s=5.0)
    r = fetch("http://no-such-host.test/a.jpg", **slow_hedge, **NO_POLICIES)
    assert r.status == "failed_to_download" and r.attempts == 1 and r.error.startswith("dns_nxdomain: cannot resolve")
    assert dns.asked("no-such-host.test") in (1, 2)  # A and AAAA once (AAAA cancelled once A says NXDOMAIN)
    dns.reset()
    r = fetch("http://no-such-host.test/a.jpg", **slow_hedge)  # robots.txt first: no image request
    assert r.status == "failed_to_download" and r.attempts == 0 and r.error.startswith("dns_nxdomain: cannot resolve")
    assert dns.asked("no-such-host.test") in (1, 2)


def test_retry_that_would_outlast_the_deadline_is_not_waited_for(loopback):
    loopback.routes["/busy.jpg"] = respond(503, headers={"Retry-After": "20"})
    start = time.monotonic()
    r = fetch(f"{loopback.base}/busy.jpg", deadline_s=2.0)
    assert r.status == "failed_to_download" and r.error == "HTTP 503" and r.attempts == 1
    assert time.monotonic() - start < 1.5


# --- the guarded resolver ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1", "10.0.0.1"], ["169.254.169.254", "127.0.0.1"], ["127.0.0.1", "::ffff:10.0.0.1"],
     ["::ffff:169.254.169.254", "127.0.0.1"], ["127.0.0.1", "127.0.0.2"]],
)
def test_a_name_resolving_to_any_forbidden_address_is_refused(loopback, dns, addresses):
    dns.records.update({"mixed.test": addresses, "clean.test": ["127.0.0.1"]})
    loopback.static("/m.jpg", JPEG)
    r = fetch(f"http://mixed.test:{loopback.port}/m.jpg", nameservers=(dns.address,))
    assert r.status == "failed_to_download" and "forbidden" in r.error and r.body == b""
    assert loopback.hits == {}  # not even robots.txt
    r = fetch(f"http://mixed.test:{loopback.port}/m.jpg", nameservers=(dns.address,), **NO_POLICIES)
    assert r.status == "failed_to_download" and "forbidden" in r.error and r.attempts == 1
    assert loopback.hits == {}
    # The same server answering allowed addresses only connects: the refusals above are the guard's.
    assert fetch(f"http://clean.test:{loopback.port}/m.jpg", nameservers=(dns.address,)).status == "success"
    assert loopback.hits["/m.jpg"] == 1 and dns.asked("mixed.test") == 4  # two fetchers, A and AAAA each


# --- slots and the deadline --------------------------------------------------------------------------------

def test_deadline_starts_when_the_request_holds_its_host_slot(loopback):
    # 16 URLs of 0.25 s on one host, 2 at a time: 2 s in all, each under its 1 s deadline. The deadline used to
    # start in the queue, failing the URLs that waited longest.
    gauge = Gauge()
    for i in range(16):
        loopback.routes[f"/q{i}.jpg"] = slow(respond(200, JPEG), 0.25, gauge)
    results = fetch_together([f"{loopback.base}/q{i}.jpg" for i in range(16)], per_host=2, deadline_s=1.0,
                             retries=0)
    assert [r.status for r in results] == ["success"] * 16, {r.error for r in results}
    assert gauge.most == 2


def test_global_connection_limit_is_a_queue_too(loopback, second):
    gauge = Gauge()
    urls = []
    for server in (loopback, second):
        for i in range(4):
            server.routes[f"/g{i}.jpg"] = slow(respond(200, JPEG), 0.2, gauge)
            urls.append(f"{server.base}/g{i}.jpg")
    results = fetch_together(urls, per_host=8, connections=2, deadline_s=0.6, retries=0)
    assert [r.status for r in results] == ["success"] * 8, {r.error for r in results}
    assert gauge.most == 2


def test_waiting_for_a_redirect_targets_host_stops_the_deadline(loopback, second):
    # Five URLs redirect to one slow host served one at a time (1 s in all, deadline 0.6 s each).
    gauge = Gauge()
    second.routes["/img.jpg"] = slow(respond(200, JPEG), 0.2, gauge)
    for i in range(5):
        loopback.routes[f"/r{i}"] = redirect(f"{second.base}/img.jpg?from={i}")
    results = fetch_together([f"{loopback.base}/r{i}" for i in range(5)], per_host=1, deadline_s=0.6, retries=0)
    assert [r.status for r in results] == ["success"] * 5, {r.error for r in results}
    assert gauge.most == 1 and {r.final_url for r in results} == {f"{second.base}/img.jpg?from={i}" for i in range(5)}
