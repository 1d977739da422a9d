"""What a site says about being collected: robots.txt (RFC 9309) and TDMRep (W3C TDM Reservation Protocol).

robots.txt, read with Protego: the group for our token (else `*`), the longest matching rule wins, `*` and `$`
patterns, Allow beats Disallow at equal length. The file is read up to 500 KiB (the rest, and the line cut in
two by that limit, are ignored) and up to 5 redirects are followed, each hop through the same address guard as
image requests. Its fate decides for the whole origin, as RFC 9309 says: a 2xx is parsed; a 4xx, or a redirect
chain longer than 5, means no rules (allow all); a 5xx or no answer (timeout, reset, a redirect we may not
follow) means disallow all. A transient failure (no answer, a reset, a 5xx, 408, 425 or 429) is first tried
again with backoff within the origin's budget; only once that is spent does RFC 9309's "unreachable means
disallow" apply, and the refusal starts with `policy_unreachable` so that a later run (`--retry-failed`) asks
again: nothing is kept between runs.

TDMRep is the machine-readable reservation of text and data mining rights of the EU copyright directive
(2019/790, article 4). It comes two ways: a `tdm-reservation: 1` header on the image (judged by the fetcher with
`tdm_header_refusal`), and the origin's `/.well-known/tdmrep.json`, an array of rules
`{"location": pattern, "tdm-reservation": 0|1, "tdm-policy": url}` whose first rule (in file order) matching the
path and query applies; `location` has robots.txt syntax (`*` any run of characters, a final `$` the end). The
file is read like robots.txt, but anything other than a 2xx with a valid array (404, 5xx, no answer, bad JSON)
declares nothing: the protocol makes errors mean "no reservation". Where both the file and the header speak we
honour the stricter: a reservation from either skips the image, even when the other says 0.

Both files are read once per origin (scheme, host and port) by `PolicyCache`, whose lookups run as tasks of
their own under their own timeout: the first URL of an origin giving up (its deadline, a cancel) does not
leave the entry pending for the URLs after it. An origin that cannot be reached at all (its name does not
resolve, resolves to a forbidden address, or refuses connections) is reported as such, not as a policy: its
URLs are download failures, and no image request is sent to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit

from protego import Protego

from laion_assets.core.download.report import POLICY_UNREACHABLE

POLICY_MAX_BYTES = 500 * 1024  # RFC 9309: crawlers must read at least 500 KiB
POLICY_MAX_REDIRECTS = 5  # RFC 9309: follow at least five
POLICY_TIMEOUT_S = 10.0  # one read of a policy file
TRANSIENT_STATUSES = frozenset({408, 425, 429})
ROBOTS_PATH = "/robots.txt"
TDMREP_PATH = "/.well-known/tdmrep.json"

T = TypeVar("T")


@dataclass(frozen=True)
class PolicyFile:
    """What reading a policy file gave: the final status and body, or why no answer came."""

    url: str
    status: int | None = None  # None: no HTTP answer (see error)
    body: bytes = b""
    error: str = ""
    origin_unreachable: bool = False  # the origin itself could not be connected to (DNS, refused, forbidden)

    attempts: int = 1  # reads made within the origin's budget
    permanent: bool = False  # no answer that another read would change (a redirect we may not follow)

    @property
    def origin(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def transient(self) -> bool:
        """Whether another read may answer: no answer (a timeout, a reset), a 5xx, 408, 425 or 429. An origin that
        cannot be connected to at all is not retried here (its image request would meet the same)."""
        if self.origin_unreachable or self.permanent:
            return False
        if self.status is None:
            return True
        return self.status >= 500 or self.status in TRANSIENT_STATUSES


def whole_lines(body: bytes, truncated: bool) -> bytes:
    """The part of a capped body to parse: without the line the cap cut in two, which could say anything."""
    if not truncated:
        return body
    return body[: body.rfind(b"\n") + 1]


@dataclass(frozen=True)
class RobotsPolicy:
    """An origin's robots.txt: its rules, or a verdict for every path (`allow_all`, with why when False)."""

    origin: str
    rules: Protego | None = None
    allow_all: bool = True
    why: str = ""
    origin_error: str = ""
    unreachable: bool = False  # disallowed because the file never answered within the budget: worth asking again

    @classmethod
    def from_file(cls, file: PolicyFile) -> RobotsPolicy:
        origin = file.origin
        if file.origin_unreachable:
            return cls(origin, allow_all=False, why="unreachable", origin_error=file.error)
        tries = f" after {file.attempts} tries" if file.attempts > 1 else ""
        if file.status is None:
            return cls(origin, allow_all=False, why=f"unreachable ({file.error}){tries}", unreachable=file.transient)
        if 200 <= file.status < 300:
            text = file.body.decode("utf-8", "replace").lstrip("\ufeff")
            return cls(origin, rules=Protego.parse(text))
        if file.status >= 500:
            return cls(origin, allow_all=False, why=f"answered HTTP {file.status}{tries}", unreachable=True)
        return cls(origin)  # 4xx, or redirects without end: "unavailable", no rules

    def refusal(self, url: str, agent_token: str) -> str | None:
        """Why robots.txt forbids `url` to `agent_token`, or None."""
        if self.rules is not None:
            if self.rules.can_fetch(url, agent_token):
                return None
            return f"robots.txt of {self.origin} disallows {_path_and_query(url)} for {agent_token}"
        if self.allow_all:
            return None
        reason = f"robots.txt of {self.origin} {self.why}: disallow all (RFC 9309)"
        return f"{POLICY_UNREACHABLE}: {reason}" if self.unreachable else reason


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str = ""


@dataclass(frozen=True)
class TdmPolicy:
    """An origin's /.well-known/tdmrep.json: its rules in file order (none when it declares nothing)."""

    origin: str
    rules: tuple[TdmRule, ...] = ()
    origin_error: str = ""

    @classmethod
    def from_file(cls, file: PolicyFile) -> TdmPolicy:
        origin = file.origin
        if file.origin_unreachable:
            return cls(origin, origin_error=file.error)
        if file.status is None or not 200 <= file.status < 300:
            return cls(origin)
        return cls(origin, parse_tdmrep(file.body))

    def refusal(self, url: str) -> str | None:
        """Why the file reserves TDM rights on `url`, or None."""
        target = _path_and_query(url)
        for rule in self.rules:
            if location_matches(rule.location, target):
                if not rule.reserved:
                    return None
                return (f"TDMRep: tdm-reservation 1 for {rule.location} in {self.origin}{TDMREP_PATH}"
                        + (f", tdm-policy {rule.policy}" if rule.policy else ""))
        return None


def parse_tdmrep(body: bytes) -> tuple[TdmRule, ...]:
    """The rules of a tdmrep.json; invalid JSON or a non-array declares nothing, and a malformed rule is skipped."""
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return ()
    if not isinstance(data, list):
        return ()
    rules = []
    for item in data:
        if not isinstance(item, dict):
            continue
        location, reservation, policy = item.get("location"), item.get("tdm-reservation"), item.get("tdm-policy")
        if not isinstance(location, str) or not location or reservation not in (0, 1):
            continue
        rules.append(TdmRule(location, reservation == 1, policy if isinstance(policy, str) else ""))
    return tuple(rules)


def tdm_header_refusal(reservations: list[str], policies: list[str]) -> str | None:
    """Why the `tdm-reservation` / `tdm-policy` response headers reserve TDM rights, or None."""
    if not any(value.strip() == "1" for value in reservations):
        return None  # 0, absent, or malformed: the protocol reads errors as no reservation
    policy = next((p.strip() for p in policies if p.strip()), "")
    return "TDMRep: tdm-reservation 1" + (f", tdm-policy {policy}" if policy else "")


def location_matches(pattern: str, target: str) -> bool:
    """Whether a robots.txt-style path pattern matches the start of `target` (path and query).

    `*` matches any run of characters and a final `$` anchors at the end. Percent-escapes are compared decoded.
    Matched part by part, leftmost first, which is exact for these patterns and linear in the target's length
    (a regular expression would backtrack on a hostile file full of stars).
    """
    pattern, target = unquote(pattern), unquote(target)
    if not pattern.startswith(("/", "*")):
        pattern = "/" + pattern
    anchored = pattern.endswith("$")
    if anchored:
        pattern = pattern[:-1]
    parts = pattern.split("*")
    if not target.startswith(parts[0]):
        return False
    if len(parts) == 1:
        return target == parts[0] if anchored else True
    pos = len(parts[0])
    for part in parts[1:-1]:
        found = target.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    last = parts[-1]
    if anchored:
        return len(target) - len(last) >= pos and target.endswith(last)
    return target.find(last, pos) >= 0


PAGE_OPT_OUTS = frozenset({"noai", "noimageai"})  # a page's refusal of AI use of its images
PAGE_AGENTS = ("ccbot", "robots", "*")  # whose directives bind us, besides our own token: the crawl's crawler's
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def page_opt_out(directives: str, agent_token: str) -> str | None:
    """The AI opt-out (`noai` / `noimageai`) of a page's robots directives as extraction records them, naming where
    it was said, or None.

    The record is `; `-separated: the page's X-Robots-Tag (first, when it had one) and a `meta NAME: CONTENT` per
    robots meta tag (NAME robots, ccbot or our token). Within a part, `agent: directive` starts that agent's
    directives (Google's reading of X-Robots-Tag), and directives before any agent are everyone's; an agent other
    than ours, CCBot (who crawled the page for Common Crawl) or `robots` does not bind us."""
    ours = {agent_token.lower(), *PAGE_AGENTS}
    for segment in directives.lower().split(";"):
        segment = segment.strip()
        where = "X-Robots-Tag"
        if segment.startswith("meta "):
            name, _, segment = segment[5:].partition(":")
            where, agent = f"<meta name={name.strip()}>", name.strip()
        else:
            agent = "*"
        for part in segment.split(","):
            head, sep, rest = part.partition(":")
            if sep and " " not in head.strip() and head.strip() not in _VALUED_DIRECTIVES:
                agent, part = head.strip(), rest
            if agent in ours and part.strip() in PAGE_OPT_OUTS:
                return f"{part.strip()} ({where})"
    return None


def _path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class PolicyCache(Generic[T]):
    """One policy file per origin, read by a task of its own under its own budget; callers await it shielded.

    The lookup belongs to no caller, so a caller that is cancelled (its deadline, the run ending) neither
    cancels it nor leaves the entry pending: the task always ends with a policy, the timeout's if need be.
    A transient failure (`PolicyFile.transient`) is read again after `backoff_s`, doubling, at most `retries`
    times, while the origin's budget (`timeout_s` in all) lasts; what the last read gave is the policy.
    """

    def __init__(self, path: str, read: Callable[[str], Awaitable[PolicyFile]], parse: Callable[[PolicyFile], T],
                 timeout_s: float, max_origins: int = 20_000, retries: int = 0, backoff_s: float = 0.5,
                 attempt_timeout_s: float | None = None) -> None:
        self._path, self._read, self._parse = path, read, parse
        self._timeout_s = timeout_s
        self._attempt_timeout_s = min(timeout_s, attempt_timeout_s or timeout_s)
        self._retries, self._backoff_s = retries, backoff_s
        self._max = max_origins
        self._tasks: dict[str, asyncio.Task[T]] = {}

    async def get(self, origin: str) -> T:
        task = self._tasks.get(origin)
        if task is None:
            task = self._tasks[origin] = asyncio.create_task(self._lookup(origin))
            self._evict()
        return await asyncio.shield(task)

    async def _lookup(self, origin: str) -> T:
        url = origin + self._path
        loop = asyncio.get_running_loop()
        end = loop.time() + self._timeout_s
        file = PolicyFile(url, error=f"no answer within {self._timeout_s:g} s")
        for attempt in range(self._retries + 1):
            left = end - loop.time()
            if left <= 0:
                break
            file = await self._read_once(url, min(left, self._attempt_timeout_s), attempt + 1)
            delay = self._backoff_s * 2**attempt
            if not file.transient or attempt == self._retries or loop.time() + delay >= end:
                break
            await asyncio.sleep(delay)
        try:
            return self._parse(file)
        except Exception as err:  # noqa: BLE001 - a parser bug must still settle the origin, as no answer
            return self._parse(PolicyFile(url, error=f"{type(err).__name__}: {err}", attempts=file.attempts))

    async def _read_once(self, url: str, timeout_s: float, attempt: int) -> PolicyFile:
        try:
            async with asyncio.timeout(timeout_s):
                file = await self._read(url)
            return dataclasses.replace(file, attempts=attempt)
        except TimeoutError:
            # The nominal limit: the budget's leftover (a few microseconds short of it) would read oddly.
            return PolicyFile(url, error=f"no answer within {self._attempt_timeout_s:g} s", attempts=attempt)
        except Exception as err:  # noqa: BLE001 - a reader bug must still settle the origin, as no answer
            return PolicyFile(url, error=f"{type(err).__name__}: {err}", attempts=attempt)

    def _evict(self) -> None:
        # Crawls meet millions of origins: forget the oldest settled ones (a later URL reads the file again).
        if len(self._tasks) <= self._max:
            return
        excess = len(self._tasks) - self._max * 3 // 4
        for origin in [o for o, t in self._tasks.items() if t.done()][:excess]:
            del self._tasks[origin]

    async def close(self) -> None:
        pending = [t for t in self._tasks.values() if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
