"""robots.txt (RFC 9309) and TDMRep: the parsers as pure functions, then the fetcher against servers this test
starts on 127.0.0.1 (nothing leaves the loopback range)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from laion_assets.core.download.fetch import Fetcher, FetchResult
from laion_assets.core.download.robots import (
    POLICY_MAX_BYTES,
    POLICY_UNREACHABLE,
    PolicyCache,
    PolicyFile,
    RobotsPolicy,
    TdmPolicy,
    location_matches,
    parse_tdmrep,
    tdm_header_refusal,
    whole_lines,
)
from laion_assets.core.settings import FetchSettings
from laion_assets_tests.conftest import LoopbackServer
from laion_assets_tests.handlers import cut_after, first_then, redirect, respond, slow

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg, the fetcher does not care"
FAST = dict(allow_networks=("127.0.0.1/32",), deadline_s=5.0, backoff_s=0.01, connect_timeout_s=2.0)
TOKEN = "laion-assets"


# One server per module, cleared for each test: closing one costs half a second (serve_forever polls that often).
# Each test makes its own Fetchers, so no policy cache outlives a test.
@pytest.fixture(scope="module")
def _server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def loopback(_server) -> LoopbackServer:
    _server.routes.clear()
    _server.hits.clear()
    return _server


def fetch_all(urls: list[str], **overrides) -> list[FetchResult]:
    """The URLs one after another through one Fetcher (so the policy caches are shared)."""
    async def go() -> list[FetchResult]:
        async with Fetcher(FetchSettings(**{**FAST, **overrides})) as f:
            return [await f.fetch(url) for url in urls]

    return asyncio.run(go())


def images(loopback, *paths: str, **headers: str) -> None:
    for path in paths:
        loopback.routes[path] = respond(200, JPEG, headers)


def robots(text: str, status: int | None = 200, error: str = "") -> RobotsPolicy:
    return RobotsPolicy.from_file(PolicyFile("http://h.test/robots.txt", status, text.encode(), error))


# --- robots.txt rules ------------------------------------------------------------------------------------------

def test_longest_match_wins_not_the_first_rule():
    # The stdlib parser took the first matching rule: `Allow: /` opened /private/.
    r = robots("User-agent: *\nAllow: /\nDisallow: /private/\n")
    assert "disallows /private/a.jpg" in r.refusal("http://h.test/private/a.jpg", TOKEN)
    assert r.refusal("http://h.test/public/a.jpg", TOKEN) is None


@pytest.mark.parametrize(
    ("text", "path", "allowed"),
    [
        ("Disallow: /*.gif$", "/a.gif", False),
        ("Disallow: /*.gif$", "/a.gif?size=2", True),  # `$` is the end of path and query
        ("Disallow: /*.gif$", "/a.gifv", True),
        ("Disallow: /p*/secret", "/photos/secret/1.jpg", False),
        ("Disallow: /p*/secret", "/photos/public/1.jpg", True),
        ("Allow: /page\nDisallow: /page", "/page.jpg", True),  # equal length: Allow wins
        ("Disallow: /page\nAllow: /page", "/page.jpg", True),  # whatever the order
        ("Allow: /page\nDisallow: /*.jpg", "/page.jpg", False),  # the longer pattern wins
        ("Disallow: /img/\nAllow: /img/ok/", "/img/ok/1.jpg", True),
        ("Disallow: /img/\nAllow: /img/ok/", "/img/no/1.jpg", False),
        ("Disallow: /a%3Cd.jpg", "/a<d.jpg", False),  # percent-escapes compared decoded
    ],
)
def test_patterns(text, path, allowed):
    r = robots(f"User-agent: *\n{text}\n")
    assert (r.refusal(f"http://h.test{path}", TOKEN) is None) is allowed


def test_our_group_else_star():
    text = "User-agent: *\nDisallow: /\n\nUser-agent: LAION-Assets\nDisallow: /nope/\n"
    r = robots(text)
    assert r.refusal("http://h.test/a.jpg", TOKEN) is None  # our group, matched without case, replaces `*`
    assert r.refusal("http://h.test/nope/a.jpg", TOKEN)
    assert r.refusal("http://h.test/a.jpg", "otherbot")  # `*` for everyone else
    assert robots("User-agent: otherbot\nDisallow: /\n").refusal("http://h.test/a.jpg", TOKEN) is None


@pytest.mark.parametrize(
    ("status", "error", "refused"),
    [(401, "", None), (403, "", None), (404, "", None), (301, "", None),  # unavailable (301: redirects ran out)
     (500, "", "HTTP 500"), (503, "", "HTTP 503"), (None, "no answer within 10 s", "unreachable")],
)
def test_status_of_robots_txt(status, error, refused):
    r = robots("User-agent: *\nAllow: /\n", status, error)
    refusal = r.refusal("http://h.test/a.jpg", TOKEN)
    if refused is None:
        assert refusal is None
    else:
        assert refused in refusal and "robots.txt of http://h.test" in refusal and "disallow all" in refusal


def test_a_line_cut_by_the_cap_is_dropped():
    body = b"User-agent: *\nDisallow: /private/\nDisallow: /"  # really "Disallow: /tmp/", cut by the cap
    assert whole_lines(body, truncated=True) == b"User-agent: *\nDisallow: /private/\n"
    assert whole_lines(body, truncated=False) == body


# --- TDMRep rules ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "target", "matches"),
    [
        ("/", "/anything?x=1", True),
        ("/images/", "/images/a.jpg", True),
        ("/images/", "/img/a.jpg", False),
        ("/images/*", "/images/a.jpg", True),
        ("/*.jpg$", "/a/b.jpg", True),
        ("/*.jpg$", "/a/b.jpg?w=2", False),
        ("/*.jpg", "/a/b.jpg?w=2", True),
        ("/a/*/c*$", "/a/b/c", True),
        ("/a/*/c*$", "/a/b/x", False),
        ("/a$", "/a", True),
        ("/a$", "/ab", False),
        ("*/thumbs/*", "/x/thumbs/1.png", True),
        ("images/", "/images/a.jpg", True),  # no leading slash: as robots.txt readers do
        ("/caf%C3%A9/", "/café/1.jpg", True),
        ("/" + "*a" * 2000 + "$", "/" + "a" * 1999 + "b", False),  # linear, not a backtracking regex
    ],
)
def test_location_matches(pattern, target, matches):
    assert location_matches(pattern, target) is matches


def tdm(rules: object, status: int | None = 200) -> TdmPolicy:
    body = rules if isinstance(rules, bytes) else json.dumps(rules).encode()
    return TdmPolicy.from_file(PolicyFile("http://h.test/.well-known/tdmrep.json", status, body))


def test_tdmrep_first_rule_in_file_order_applies():
    policy = tdm([
        {"location": "/free/*", "tdm-reservation": 0},
        {"location": "/*.jpg", "tdm-reservation": 1, "tdm-policy": "https://h.test/policy.json"},
    ])
    assert policy.refusal("http://h.test/free/a.jpg") is None  # the first rule, though the second matches too
    refusal = policy.refusal("http://h.test/b.jpg")
    assert "TDMRep: tdm-reservation 1" in refusal and "https://h.test/policy.json" in refusal
    assert policy.refusal("http://h.test/b.png") is None  # no rule matches


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"location": "/", "tdm-reservation": 1}', b"\xff\xfe", b"[1, 2]", b'[{"location": "/"}]',
     b'[{"location": "/", "tdm-reservation": "yes"}]', b'[{"tdm-reservation": 1}]'],
)
def test_tdmrep_invalid_declares_nothing(body):
    assert tdm(body).refusal("http://h.test/a.jpg") is None


def test_tdmrep_malformed_rule_is_skipped_not_the_file():
    policy = tdm([{"location": "/", "tdm-reservation": 7}, {"location": "/", "tdm-reservation": 1}])
    assert policy.refusal("http://h.test/a.jpg")
    assert parse_tdmrep(b'\xef\xbb\xbf[{"location": "/", "tdm-reservation": 1}]')  # a BOM is no error


@pytest.mark.parametrize("status", [404, 500, None])
def test_tdmrep_errors_declare_nothing(status):
    assert tdm([{"location": "/", "tdm-reservation": 1}], status).refusal("http://h.test/a.jpg") is None


def test_tdm_header():
    assert tdm_header_refusal(["1"], []) == "TDMRep: tdm-reservation 1"
    assert tdm_header_refusal([" 1 "], ["https://h.test/p"]) == "TDMRep: tdm-reservation 1, tdm-policy https://h.test/p"
    assert tdm_header_refusal(["0"], ["https://h.test/p"]) is None
    assert tdm_header_refusal(["yes"], []) is None
    assert tdm_header_refusal([], []) is None


# --- the cache ----------------------------------------------------------------------------------------------

def test_policy_cache_survives_a_cancelled_first_caller():
    reads = []

    async def read(url: str) -> PolicyFile:
        reads.append(url)
        await asyncio.sleep(0.2)
        return PolicyFile(url, 404)

    async def go() -> list[RobotsPolicy]:
        cache = PolicyCache("/robots.txt", read, RobotsPolicy.from_file, timeout_s=5)
        first = asyncio.create_task(cache.get("http://h.test"))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(1):
            return await asyncio.gather(*(cache.get("http://h.test") for _ in range(3)))

    results = asyncio.run(go())
    assert [r.allow_all for r in results] == [True] * 3 and reads == ["http://h.test/robots.txt"]


def test_policy_cache_timeout_settles_the_origin():
    async def read(url: str) -> PolicyFile:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    async def go() -> RobotsPolicy:
        cache = PolicyCache("/robots.txt", read, RobotsPolicy.from_file, timeout_s=0.1)
        return await cache.get("http://h.test")

    refusal = asyncio.run(go()).refusal("http://h.test/a.jpg", TOKEN)
    assert "no answer within 0.1 s" in refusal and "disallow all" in refusal


def test_policy_cache_forgets_the_oldest_origins_beyond_its_size():
    reads: list[str] = []

    async def read(url: str) -> PolicyFile:
        reads.append(url)
        return PolicyFile(url, 404)

    async def go() -> None:
        cache = PolicyCache("/robots.txt", read, RobotsPolicy.from_file, timeout_s=5, max_origins=4)
        for origin in [f"http://h{i}.test" for i in range(5)] + ["http://h0.test", "http://h3.test"]:
            await cache.get(origin)

    asyncio.run(go())
    assert reads.count("http://h0.test/robots.txt") == 2  # forgotten, read again
    assert reads.count("http://h3.test/robots.txt") == 1


# --- robots.txt through the fetcher ------------------------------------------------------------------------

def test_allow_all_before_disallow_private(loopback):
    loopback.static("/robots.txt", b"User-agent: *\nAllow: /\nDisallow: /private/\n", "text/plain")
    images(loopback, "/private/a.jpg", "/public/a.jpg")
    private, public = fetch_all([f"{loopback.base}/private/a.jpg", f"{loopback.base}/public/a.jpg"])
    assert private.status == "skipped_by_policy" and "robots.txt" in private.error and private.attempts == 0
    assert public.status == "success"
    assert "/private/a.jpg" not in loopback.hits and loopback.hits["/robots.txt"] == 1


def test_redirected_robots_txt_is_followed(loopback):
    # A 3xx used to count as "no robots.txt": allow all.
    loopback.routes["/robots.txt"] = redirect("/r1")
    for i in range(1, 5):
        loopback.routes[f"/r{i}"] = redirect(f"/r{i + 1}", 301)
    loopback.static("/r5", b"User-agent: laion-assets\nDisallow: /\n", "text/plain")  # the fifth redirect
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"])
    assert r.status == "skipped_by_policy" and "robots.txt" in r.error
    assert "/a.jpg" not in loopback.hits and loopback.hits["/r5"] == 1


def test_robots_txt_redirects_beyond_five_mean_unavailable(loopback):
    loopback.routes["/robots.txt"] = redirect("/r1")
    for i in range(1, 6):
        loopback.routes[f"/r{i}"] = redirect(f"/r{i + 1}")
    loopback.static("/r6", b"User-agent: *\nDisallow: /\n", "text/plain")  # the sixth: never read
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"])
    assert r.status == "success" and "/r6" not in loopback.hits


def test_robots_txt_redirect_to_a_forbidden_address_disallows(loopback):
    loopback.routes["/robots.txt"] = redirect(f"http://127.0.0.2:{loopback.port}/robots.txt")
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"])
    assert r.status == "skipped_by_policy" and "robots.txt" in r.error and "forbidden" in r.error
    assert "/a.jpg" not in loopback.hits


@pytest.mark.parametrize(
    ("handler", "why"),
    [(respond(503), "HTTP 503"), (respond(500), "HTTP 500"),
     (slow(respond(200, b"User-agent: *\nAllow: /\n"), 1.0), "no answer within 0.5 s"),
     (cut_after(b"User-agent: *\nAllow: /\n" * 100, 30), "unreachable")],
)
def test_robots_txt_server_error_or_no_answer_disallows_all(loopback, handler, why):
    loopback.routes["/robots.txt"] = handler
    images(loopback, "/a.jpg", "/b.jpg")
    a, b = fetch_all([f"{loopback.base}/a.jpg", f"{loopback.base}/b.jpg"], deadline_s=0.5, retries=0)
    for r in (a, b):
        assert r.status == "skipped_by_policy" and "robots.txt" in r.error and why in r.error, r.error
    assert "/a.jpg" not in loopback.hits and loopback.hits["/robots.txt"] == 1


@pytest.mark.parametrize("status", [401, 403, 404, 410])
def test_robots_txt_4xx_allows_all(loopback, status):
    loopback.routes["/robots.txt"] = respond(status, b"User-agent: *\nDisallow: /\n")
    images(loopback, "/a.jpg")
    assert fetch_all([f"{loopback.base}/a.jpg"])[0].status == "success"


def test_robots_txt_is_read_whole_up_to_500_kib(loopback):
    filler = b"# " + b"x" * 97 + b"\n"  # 100 bytes a line
    head = b"User-agent: *\nDisallow: /early/\n" + filler * 2000  # 200 kB: more than aiohttp reads at once
    tail = b"Disallow: /late/\n" + filler * (4000 - 2000)
    cut_at = POLICY_MAX_BYTES - len(head) - len(tail)
    # The cap falls inside "Disallow: /tmp/": kept, its "Disallow: /" would close the whole site.
    body = head + tail + filler * (cut_at // len(filler)) + b"#" * (cut_at % len(filler) - 12)
    body += b"\nDisallow: /tmp/\nDisallow: /beyond/\n"
    assert len(body) > POLICY_MAX_BYTES and body[:POLICY_MAX_BYTES].endswith(b"Disallow: /")
    loopback.static("/robots.txt", body, "text/plain")
    paths = ["/early/a.jpg", "/late/a.jpg", "/beyond/a.jpg", "/tmp/a.jpg", "/a.jpg"]
    images(loopback, *paths)
    results = fetch_all([loopback.base + p for p in paths])
    assert [r.status for r in results] == ["skipped_by_policy"] * 2 + ["success"] * 3


@pytest.mark.parametrize("path", ["/robots.txt", "/.well-known/tdmrep.json"])
def test_a_cancelled_first_url_does_not_leave_the_origin_pending(loopback, path):
    loopback.routes[path] = slow(respond(404), 0.6)
    images(loopback, *(f"/{i}.jpg" for i in range(4)))

    async def go() -> tuple[list[FetchResult], float]:
        async with Fetcher(FetchSettings(**{**FAST, "deadline_s": 3.0})) as f:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(f.fetch(f"{loopback.base}/0.jpg"), 0.2)  # gives up while the file is read
            start = time.monotonic()
            results = await asyncio.gather(*(f.fetch(f"{loopback.base}/{i}.jpg") for i in range(1, 4)))
            return results, time.monotonic() - start

    results, took = asyncio.run(go())
    assert [r.status for r in results] == ["success"] * 3, [r.error for r in results]
    assert took < 2.0 and loopback.hits[path] == 1


def test_policy_lookups_do_not_count_against_the_deadline(loopback):
    loopback.routes["/robots.txt"] = slow(respond(404), 0.6)
    loopback.routes["/a.jpg"] = slow(respond(200, JPEG), 0.5)
    (r,) = fetch_all([f"{loopback.base}/a.jpg"], deadline_s=0.9, respect_tdmrep=False)
    assert r.status == "success", r.error


def test_robots_txt_that_times_out_once_is_asked_again(loopback):
    # One hiccup used to disallow the whole origin for the run.
    handler, calls = first_then(slow(respond(200, b"User-agent: *\nDisallow: /private/\n"), 1.0),
                                respond(200, b"User-agent: *\nDisallow: /private/\n"))
    loopback.routes["/robots.txt"] = handler
    images(loopback, "/a.jpg", "/private/b.jpg")
    a, b = fetch_all([f"{loopback.base}/a.jpg", f"{loopback.base}/private/b.jpg"], connect_timeout_s=0.3)
    assert a.status == "success", a.error
    assert b.status == "skipped_by_policy" and "disallows /private/b.jpg" in b.error
    assert len(calls) == 2 and "/private/b.jpg" not in loopback.hits


@pytest.mark.parametrize("handler", [respond(503), slow(respond(200, b"User-agent: *\nAllow: /\n"), 1.0)])
def test_robots_txt_unreachable_after_its_budget_says_so(loopback, handler):
    loopback.routes["/robots.txt"] = handler
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"], connect_timeout_s=0.3, retries=2)
    assert r.status == "skipped_by_policy" and r.error.startswith(f"{POLICY_UNREACHABLE}: robots.txt of"), r.error
    assert "after 3 tries" in r.error and loopback.hits["/robots.txt"] == 3 and "/a.jpg" not in loopback.hits


def test_a_later_run_asks_again(loopback):
    loopback.routes["/robots.txt"] = respond(503)
    images(loopback, "/a.jpg")
    (first,) = fetch_all([f"{loopback.base}/a.jpg"], retries=0)
    loopback.routes["/robots.txt"] = respond(404)
    (later,) = fetch_all([f"{loopback.base}/a.jpg"], retries=0)
    assert first.error.startswith(POLICY_UNREACHABLE) and later.status == "success"


def test_a_redirect_we_may_not_follow_is_not_retried(loopback):
    loopback.routes["/robots.txt"] = redirect(f"http://127.0.0.2:{loopback.port}/robots.txt")
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"], retries=2)
    assert r.status == "skipped_by_policy" and not r.error.startswith(POLICY_UNREACHABLE)
    assert loopback.hits["/robots.txt"] == 1


# --- TDMRep through the fetcher ----------------------------------------------------------------------------

def test_tdm_reservation_header(loopback):
    images(loopback, "/reserved.jpg", **{"tdm-reservation": "1", "tdm-policy": "https://example.com/tdm.json"})
    images(loopback, "/free.jpg", **{"tdm-reservation": "0"})
    reserved, free = fetch_all([f"{loopback.base}/reserved.jpg", f"{loopback.base}/free.jpg"])
    assert reserved.status == "skipped_by_policy" and reserved.body == b""
    assert reserved.error == "TDMRep: tdm-reservation 1, tdm-policy https://example.com/tdm.json"
    assert free.status == "success"
    assert fetch_all([f"{loopback.base}/reserved.jpg"], respect_tdmrep=False)[0].status == "success"


def test_tdmrep_json_read_once_per_origin(loopback):
    rules = [{"location": "/free/", "tdm-reservation": 0},
             {"location": "/*.jpg$", "tdm-reservation": 1, "tdm-policy": "https://example.com/tdm.json"}]
    loopback.static("/.well-known/tdmrep.json", json.dumps(rules).encode(), "application/json")
    paths = ["/free/a.jpg", "/b.jpg", "/b.jpg?w=2", "/c.png"]
    images(loopback, *paths)
    results = fetch_all([loopback.base + p for p in paths])
    assert [r.status for r in results] == ["success", "skipped_by_policy", "success", "success"]
    assert "tdmrep.json" in results[1].error and "https://example.com/tdm.json" in results[1].error
    assert results[1].attempts == 0 and loopback.hits["/b.jpg"] == 1  # the one with ?w=2
    assert loopback.hits["/.well-known/tdmrep.json"] == 1
    fetch_all([loopback.base + p for p in paths], respect_tdmrep=False)
    assert loopback.hits["/.well-known/tdmrep.json"] == 1


def test_tdmrep_json_redirect_is_followed(loopback):
    loopback.routes["/.well-known/tdmrep.json"] = redirect("/tdm/rules.json", 301)
    loopback.static("/tdm/rules.json", b'[{"location": "/", "tdm-reservation": 1}]')
    images(loopback, "/a.jpg")
    (r,) = fetch_all([f"{loopback.base}/a.jpg"])
    assert r.status == "skipped_by_policy" and "TDMRep" in r.error


@pytest.mark.parametrize("handler", [respond(404), respond(500), respond(200, b"{not json")])
def test_tdmrep_json_missing_or_broken_declares_nothing(loopback, handler):
    loopback.routes["/.well-known/tdmrep.json"] = handler
    images(loopback, "/a.jpg")
    assert fetch_all([f"{loopback.base}/a.jpg"])[0].status == "success"


def test_the_stricter_of_tdmrep_json_and_header_wins(loopback):
    loopback.static("/.well-known/tdmrep.json",
                    b'[{"location": "/file-reserves/", "tdm-reservation": 1}, {"location": "/", "tdm-reservation": 0}]')
    images(loopback, "/header-reserves/a.jpg", **{"tdm-reservation": "1"})
    images(loopback, "/file-reserves/a.jpg", **{"tdm-reservation": "0"})
    by_header, by_file = fetch_all([f"{loopback.base}/header-reserves/a.jpg", f"{loopback.base}/file-reserves/a.jpg"])
    assert by_header.status == "skipped_by_policy" and by_header.error == "TDMRep: tdm-reservation 1"
    assert by_file.status == "skipped_by_policy" and "tdmrep.json" in by_file.error
    assert "/file-reserves/a.jpg" not in loopback.hits  # reserved before any image request
