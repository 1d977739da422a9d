"""Polite and safe HTTP fetching of image URLs with aiohttp.

Safety: only http(s); every host is resolved by a guarded resolver that refuses forbidden addresses and
caches what it checked, and the connector connects to exactly those addresses (no second lookup, so
DNS rebinding cannot slip through); redirects are followed by hand, each hop re-checked, at most
`max_redirects`; a byte cap per response and a total deadline per URL (retries and redirects included).
Politeness: an honest User-Agent, robots.txt per host (fetched once, cached, obeyed for our token),
`X-Robots-Tag` opt-outs, a per-host concurrency limit, backoff honouring `Retry-After` on 429/503, and
retries only on transient errors (timeouts, 5xx, resets), never on 404.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import urllib.robotparser
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from laion_assets.core.download.guard import IPNetwork, forbidden_reason, parse_networks
from laion_assets.core.settings import FetchSettings

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECTS = (301, 302, 303, 307, 308)


class PolicyRefusal(Exception):
    """The URL must not be fetched (robots.txt, X-Robots-Tag): recorded as skipped_by_policy."""


class FetchFailure(Exception):
    """The URL could not be fetched; transient ones are retried."""

    def __init__(self, message: str, http_status: int | None = None, transient: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.transient = transient
        self.retry_after = retry_after


class ForbiddenAddress(OSError):
    pass


@dataclass
class FetchResult:
    status: str  # success | failed_to_download | skipped_by_policy
    body: bytes = b""
    error: str = ""
    http_status: int | None = None
    final_url: str = ""
    attempts: int = 0


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, refuses forbidden addresses, and caches the checked answer."""

    def __init__(self, allow: tuple[IPNetwork, ...], ttl_s: float = 300.0) -> None:
        self._allow = allow
        self._ttl = ttl_s
        self._cache: dict[tuple[str, int], tuple[float, list[ResolveResult]]] = {}
        self._loop = asyncio.get_running_loop()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        key = (host, port)
        hit = self._cache.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        try:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=socket.AF_UNSPEC)
        except socket.gaierror as err:
            raise OSError(f"cannot resolve {host}: {err}") from err
        results: list[ResolveResult] = []
        refused = []
        for fam, _, proto, _, sockaddr in infos:
            address = sockaddr[0]
            reason = forbidden_reason(address, self._allow)
            if reason:
                refused.append(f"{address} ({reason})")
                continue
            results.append(ResolveResult(hostname=host, host=address, port=sockaddr[1], family=fam, proto=proto,
                                         flags=socket.AI_NUMERICHOST))
        if refused:
            # One forbidden answer taints the host: a mixed answer is how rebinding attacks start.
            raise ForbiddenAddress(f"{host} resolves to a forbidden address: {', '.join(refused)}")
        self._cache[key] = (time.monotonic() + self._ttl, results)
        return results

    async def close(self) -> None:
        pass


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return min(cap, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
        except (TypeError, ValueError):
            return None


def opt_out(x_robots_tag: str, agent_token: str) -> str | None:
    """The opt-out directive of an X-Robots-Tag value that applies to us (or to every agent)."""
    for part in x_robots_tag.lower().split(","):
        part = part.strip()
        agent, sep, directive = part.partition(":")
        if sep and agent.strip() not in (agent_token.lower(), "*") and " " not in agent.strip():
            # "otherbot: noai" names another agent; "unavailable_after: date" is not an agent.
            if agent.strip() != "unavailable_after":
                continue
        directive = (directive if sep else part).strip()
        if directive in OPT_OUT_DIRECTIVES:
            return directive
    return None


class Fetcher:
    """One per event loop: a session, the robots.txt cache and the per-host limits."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._allow = parse_networks(settings.allow_networks)
        self._robots: dict[str, asyncio.Future[urllib.robotparser.RobotFileParser | None]] = {}
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._allow), use_dns_cache=False, limit=self.settings.connections,
            limit_per_host=self.settings.per_host, enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s,
                                        sock_read=self.settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": self.settings.user_agent},
            auto_decompress=True, trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session:
            await self._session.close()

    def _check_target(self, url: str) -> tuple[str, str]:
        """(scheme, host) of a URL we may connect to, or FetchFailure."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchFailure(f"scheme {parts.scheme or '(none)'!r} is not http(s)")
        host = parts.hostname or ""
        if not host:
            raise FetchFailure("URL has no host")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:  # IP literals never reach the resolver: judge them here
            reason = forbidden_reason(literal, self._allow)
            if reason:
                raise FetchFailure(f"address {host} is forbidden ({reason})")
        return parts.scheme, parts.netloc

    async def _robots_for(self, scheme: str, netloc: str) -> urllib.robotparser.RobotFileParser | None:
        key = f"{scheme}://{netloc}"
        fut = self._robots.get(key)
        if fut is None:
            fut = self._robots[key] = asyncio.get_running_loop().create_future()
            parser: urllib.robotparser.RobotFileParser | None = None
            try:
                async with asyncio.timeout(min(10.0, self.settings.deadline_s)):
                    assert self._session is not None
                    async with self._session.get(f"{key}/robots.txt", allow_redirects=False) as resp:
                        if resp.status == 200:
                            text = (await resp.content.read(512 * 1024)).decode("utf-8", "replace")
                            parser = urllib.robotparser.RobotFileParser()
                            parser.parse(text.splitlines())
                        elif resp.status >= 500:
                            # RFC 9309: an unreachable robots.txt (server error) means disallow all.
                            parser = urllib.robotparser.RobotFileParser()
                            parser.parse(["User-agent: *", "Disallow: /"])
            except (aiohttp.ClientError, TimeoutError, OSError):
                parser = None  # unreachable host: the image fetch itself will report it
            fut.set_result(parser)
        return await fut

    def _host_limit(self, netloc: str) -> asyncio.Semaphore:
        sem = self._hosts.get(netloc)
        if sem is None:
            sem = self._hosts[netloc] = asyncio.Semaphore(self.settings.per_host)
        return sem

    async def _once(self, url: str) -> tuple[bytes, int, str]:
        s = self.settings
        current = url
        assert self._session is not None
        for _hop in range(s.max_redirects + 1):
            scheme, netloc = self._check_target(current)
            if s.respect_robots_txt:
                robots = await self._robots_for(scheme, netloc)
                if robots is not None and not robots.can_fetch(s.agent_token, current):
                    raise PolicyRefusal(f"robots.txt of {netloc} disallows {s.agent_token}")
            async with self._host_limit(netloc), self._session.get(current, allow_redirects=False) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchFailure(f"HTTP {resp.status} without Location", resp.status)
                    current = urljoin(current, location)
                    continue
                if resp.status != 200:
                    transient = resp.status in (408, 425, 429) or resp.status >= 500
                    raise FetchFailure(f"HTTP {resp.status}", resp.status, transient,
                                       _retry_after(resp.headers.get("Retry-After"), s.max_retry_after_s))
                if s.respect_x_robots_tag:
                    directive = opt_out(", ".join(resp.headers.getall("X-Robots-Tag", [])), s.agent_token)
                    if directive:
                        raise PolicyRefusal(f"X-Robots-Tag: {directive}")
                declared = resp.content_length
                if declared is not None and declared > s.max_bytes:
                    raise FetchFailure(f"Content-Length {declared} is over the cap of {s.max_bytes} bytes", 200)
                chunks = []
                size = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > s.max_bytes:
                        raise FetchFailure(f"body is over the cap of {s.max_bytes} bytes", 200)
                    chunks.append(chunk)
                return b"".join(chunks), resp.status, current
        raise FetchFailure(f"more than {s.max_redirects} redirects")

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL under the total deadline; never raises."""
        s = self.settings
        result = FetchResult(status="failed_to_download", final_url=url)
        try:
            async with asyncio.timeout(s.deadline_s):
                for attempt in range(s.retries + 1):
                    result.attempts = attempt + 1
                    try:
                        body, status, final = await self._once(url)
                        return FetchResult("success", body, "", status, final, attempt + 1)
                    except FetchFailure as err:
                        result.error, result.http_status = str(err), err.http_status
                        if not err.transient or attempt == s.retries:
                            return result
                        await asyncio.sleep(err.retry_after if err.retry_after is not None
                                            else s.backoff_s * 2**attempt)
                    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientOSError, aiohttp.ServerTimeoutError, ConnectionResetError) as err:
                        # Transient: a reset or a body cut short. (A forbidden address is not.)
                        if isinstance(getattr(err, "os_error", None), ForbiddenAddress):
                            result.error = str(err.os_error)
                            return result
                        result.error = f"{type(err).__name__}: {err}"
                        if attempt == s.retries:
                            return result
                        await asyncio.sleep(s.backoff_s * 2**attempt)
        except PolicyRefusal as err:
            return FetchResult("skipped_by_policy", error=str(err), final_url=url, attempts=result.attempts)
        except TimeoutError:
            result.error = f"total deadline of {s.deadline_s} s exceeded"
        except aiohttp.ClientConnectorError as err:
            result.error = str(err.os_error) if isinstance(err.os_error, ForbiddenAddress) else str(err)
        except (aiohttp.ClientError, OSError, ValueError) as err:
            result.error = f"{type(err).__name__}: {err}"
        return result
