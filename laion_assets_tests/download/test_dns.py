"""The fetcher's resolver against a name server this test starts on 127.0.0.1 that drops, SERVFAILs, answers late
or NXDOMAINs; the names resolve to 127.0.0.1 (the allowed network)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from laion_assets.core.download.dns import DnsResolver, ResolveFailure
from laion_assets.core.download.fetch import Fetcher
from laion_assets.core.settings import FetchSettings
from laion_assets.offline.dns_server import Action, LoopbackDns, fail_first
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets_tests.conftest import LoopbackServer

JPEG = jpeg_bytes(render(Scene("circle", "red", "white", "center"), (64, 48), seed=1))
QUICK = dict(timeout_s=0.2, retries=3, backoff_s=0.01)
# For tests that count queries and whose subject is not the timeout: on a loaded machine an answer slower than a
# 0.2 s timeout brings a hedged query the count is not about.
STEADY = dict(QUICK, timeout_s=1.0)


@pytest.fixture(scope="module")
def web() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    server.static("/a.jpg", JPEG, "image/jpeg")
    yield server
    server.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}) as server:
        yield server


def resolve(server: LoopbackDns, *names: str, **options) -> tuple[list[object], int]:
    """Each name resolved through one DnsResolver, all at once: the answers or failures, and the queries sent."""
    async def go() -> tuple[list[object], int]:
        resolver = DnsResolver((server.address,), **{**QUICK, **options})
        try:
            found = await asyncio.gather(*(resolver.resolve(n) for n in names), return_exceptions=True)
            return list(found), resolver.queries
        finally:
            await resolver.close()

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["drop", "servfail"])
def test_first_queries_failing_are_retried(dns, kind):
    dns.behave = fail_first(2, kind)
    # A dropped query is retried after the timeout, so that one stays short (and a slow answer may bring a hedge).
    (answer,), queries = resolve(dns, "img.test", **(QUICK if kind == "drop" else STEADY))
    assert answer.addresses == ((2, "127.0.0.1"),)
    assert queries == 6 if kind == "servfail" else 6 <= queries <= 8  # three of A, three of AAAA


def test_a_slow_answer_is_hedged_and_still_heard(dns):
    # The first query answers after 0.5 s, later ones at once: the second (sent after 0.2 s) wins.
    dns.behave = lambda name, qtype, nth: Action("answer", 0.5 if nth == 1 else 0.0)
    start = time.monotonic()
    (answer,), queries = resolve(dns, "img.test")
    assert answer.addresses and queries == 4 and time.monotonic() - start < 0.45
    # Every answer late: the first is still heard at 0.5 s (giving up on it would wait for the third, at 0.9 s).
    dns.behave = lambda name, qtype, nth: Action("answer", 0.5)
    start = time.monotonic()
    (answer,), queries = resolve(dns, "other.test", timeout_s=0.2, retries=2)
    assert answer.addresses and queries == 6 and time.monotonic() - start < 0.7


def test_nxdomain_is_an_answer_never_retried(dns):
    (failure,), queries = resolve(dns, "missing.test", **STEADY)
    assert isinstance(failure, ResolveFailure) and failure.reason == "dns_nxdomain" and not failure.transient
    assert queries == 2 and dns.asked("missing.test") in (1, 2)  # A and AAAA once each (AAAA maybe cancelled)


def test_retries_spent_is_a_temporary_failure(dns):
    dns.behave = fail_first(99, "servfail")
    (failure,), queries = resolve(dns, "img.test", **{**STEADY, "retries": 2})
    assert isinstance(failure, ResolveFailure) and failure.reason == "dns_temporary" and failure.transient
    assert str(failure).startswith("dns_temporary: cannot resolve img.test") and queries == 6


def test_answers_and_failures_are_cached_and_lookups_shared(dns):
    async def go() -> tuple[int, list[int]]:
        resolver = DnsResolver((dns.address,), **STEADY)
        try:
            # Ten at once share one lookup; later ones hit the cache; NXDOMAIN is remembered too.
            await asyncio.gather(*(resolver.resolve("img.test") for _ in range(10)))
            await resolver.resolve("IMG.test.")
            for _ in range(3):
                with pytest.raises(ResolveFailure):
                    await resolver.resolve("missing.test")
            return resolver.queries, [dns.asked("img.test"), dns.asked("missing.test")]
        finally:
            await resolver.close()

    queries, asked = asyncio.run(go())
    # The AAAA query of missing.test is cancelled once A says NXDOMAIN: it may not have reached the server yet.
    assert queries == 4 and asked[0] == 2 and asked[1] in (1, 2)


def test_ttl_is_honoured(dns):
    dns.ttl = 1

    async def go() -> int:
        resolver = DnsResolver((dns.address,), **STEADY)
        try:
            await resolver.resolve("img.test")
            await resolver.resolve("img.test")
            await asyncio.sleep(1.1)
            await resolver.resolve("img.test")
            return resolver.queries
        finally:
            await resolver.close()

    assert asyncio.run(go()) == 4


def test_lookups_in_flight_are_bounded(dns):
    names = [f"n{i}.test" for i in range(6)]
    dns.records.update({n: ["127.0.0.1"] for n in names})
    dns.behave = lambda name, qtype, nth: Action("answer", 0.15)
    start = time.monotonic()
    found, _ = resolve(dns, *names, in_flight=2, timeout_s=1.0)
    assert all(not isinstance(f, Exception) for f in found)
    assert time.monotonic() - start >= 0.45  # three rounds of two


def test_nameserver_setting_is_checked():
    assert FetchSettings(nameservers=("127.0.0.1:5353", "::1", "[::1]:53")).nameservers
    for bad in ("dns.example", "127.0.0.1:0", "[::1]x"):
        with pytest.raises(ValueError, match="name server"):
            FetchSettings(nameservers=(bad,))


def fetch_all(urls: list[str], dns: LoopbackDns, **overrides) -> list[object]:
    settings = FetchSettings(allow_networks=("127.0.0.1/32",), nameservers=(dns.address,), dns_timeout_s=0.2,
                             dns_backoff_s=0.01, deadline_s=5.0, **overrides)

    async def go() -> list[object]:
        async with Fetcher(settings) as f:
            return await asyncio.gather(*(f.fetch(u) for u in urls))

    return asyncio.run(go())


def test_fetcher_survives_a_stumbling_resolver(web, dns):
    # The first two queries of each name and type dropped: every URL still succeeds, robots.txt included.
    dns.behave = fail_first(2, "drop")
    urls = [f"http://{host}:{web.port}/a.jpg?{i}" for host in ("img.test", "other.test") for i in range(5)]
    results = fetch_all(urls, dns)
    assert [r.status for r in results] == ["success"] * 10, {r.error for r in results}
    assert 6 <= dns.asked("img.test") <= 8  # three each of A and AAAA (a slow machine may hedge once more), shared
    # by robots.txt, tdmrep.json and the five images


def test_fetcher_row_errors_tell_temporary_from_nxdomain(web, dns):
    dns.behave = lambda name, qtype, nth: Action("servfail" if name == "img.test" else "answer")
    down, missing = fetch_all([f"http://img.test:{web.port}/a.jpg", f"http://gone.test:{web.port}/a.jpg"], dns,
                              dns_retries=1)
    assert down.status == missing.status == "failed_to_download"
    assert down.error.startswith("dns_temporary: ") and missing.error.startswith("dns_nxdomain: ")


def test_a_lost_a_record_beside_an_empty_aaaa_is_temporary_not_no_address(dns):
    # One getaddrinfo for both families reads this as "no address"; the row would never be retried.
    dns.behave = lambda name, qtype, nth: Action("drop" if qtype == 1 else "answer")
    (failure,), _ = resolve(dns, "img.test", retries=1)
    assert isinstance(failure, ResolveFailure) and failure.reason == "dns_temporary"
    dns.records["v6.test"] = ["::1"]
    dns.behave = lambda name, qtype, nth: Action("answer")
    (answer,), _ = resolve(dns, "v6.test")
    assert answer.addresses == ((10, "::1"),)
