"""Polite and safe HTTP fetching of image URLs with aiohttp.

Safety: only http(s); every host is resolved (c-ares, with retries and a cache: `dns.py`) by a guarded resolver
that refuses forbidden addresses (one forbidden address in the answer refuses the host), and the connector
connects to exactly those addresses (no second lookup, so DNS rebinding cannot slip through); redirects are
followed by hand, each hop re-checked, at most `max_redirects`; a byte cap per response. Through a proxy
(`proxy`, or the environment's with `trust_env`) the target is resolved and checked here and the request names
the checked address, so the proxy never resolves it again; the proxy itself is trusted.

Politeness: an honest User-Agent; robots.txt (RFC 9309) and TDMRep (`/.well-known/tdmrep.json` and the
`tdm-reservation` header) per origin, see `robots.py`; `X-Robots-Tag` opt-outs; at most `per_host` requests
per host and `connections` in all.

One URL goes: check the target; the policy lookups of its origin (read once per origin, under their own
timeout); take a slot of its host, then a global one; then the deadline (`deadline_s`) starts, covering the
requests, redirects and retries, so that time queued behind a busy host or a policy lookup is not counted
against it. A redirect to another host hands both slots back and waits for the new host's (so no URL ever
holds two hosts' slots, and two URLs redirecting across each other's hosts cannot wait on each other); that
wait and the new origin's policy lookups stop the deadline's clock. The aiohttp connector has no limit of its
own: it must never queue a request that holds its slots.

Retries (`retries`, backoff doubling from `backoff_s`, or `Retry-After` up to `max_retry_after_s`): timeouts
of a connect or a read (not the deadline), HTTP 5xx, 408, 425 and 429, connection resets and bodies cut short.
Not retried: other 4xx, DNS failures (the resolver has retried already; the error starts with its reason,
`dns_temporary` or `dns_nxdomain`...), refused connections, TLS errors, forbidden addresses, and a retry whose
wait would outlast the deadline.

Outcomes: "success"; "skipped_by_policy" (robots.txt, TDMRep, X-Robots-Tag; `error` says which and why);
"failed_to_download" (`error` says why; an origin that cannot be reached while reading its robots.txt or
tdmrep.json fails there, with no image request sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from laion_assets.core.crawl.source import retry_after_s
from laion_assets.core.download.dns import DnsResolver, ResolveFailure
from laion_assets.core.download.guard import IPNetwork, forbidden_reason, parse_networks
from laion_assets.core.download.robots import (
    POLICY_MAX_BYTES,
    POLICY_MAX_REDIRECTS,
    POLICY_TIMEOUT_S,
    ROBOTS_PATH,
    TDMREP_PATH,
    PolicyCache,
    PolicyFile,
    RobotsPolicy,
    TdmPolicy,
    tdm_header_refusal,
    whole_lines,
)
from laion_assets.core.settings import FetchSettings

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUSES = frozenset({408, 425, 429})


class PolicyRefusal(Exception):
    """The URL must not be fetched (robots.txt, TDMRep, X-Robots-Tag): recorded as skipped_by_policy."""


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
    attempts: int = 0  # image requests tried (0: refused before any was sent)


class GuardedResolver(AbstractResolver):
    """Resolves through the DNS resolver (`dns.py`) and refuses a name any of whose addresses is forbidden; what it
    returns is what the connector connects to. `trusted` names (the configured proxy) are not judged."""

    def __init__(self, dns: DnsResolver, allow: tuple[IPNetwork, ...], trusted: frozenset[str] = frozenset()) -> None:
        self.dns = dns
        self._allow = allow
        self._trusted = trusted

    def trusts(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._trusted

    async def checked(self, host: str, trusted: bool = False) -> tuple[tuple[int, str], ...]:
        """The (family, address) pairs of `host`, every one allowed (unless `trusted`); ForbiddenAddress or
        ResolveFailure."""
        answer = await self.dns.resolve(host)
        if trusted:
            return answer.addresses
        refused = []
        for _, address in answer.addresses:
            reason = forbidden_reason(address, self._allow)
            if reason:
                refused.append(f"{address} ({reason})")
        if refused:
            # One forbidden answer taints the host: a mixed answer is how rebinding attacks start.
            raise ForbiddenAddress(f"{host} resolves to a forbidden address: {', '.join(refused)}")
        return answer.addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        # The connector asks for the proxy's name too; a target with that name was checked by Fetcher._get.
        return [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=socket.IPPROTO_TCP,
                              flags=socket.AI_NUMERICHOST)
                for fam, address in await self.checked(host, trusted=self.trusts(host))]

    async def close(self) -> None:
        await self.dns.close()


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


def _transient(err: BaseException) -> bool:
    """Whether another try may succeed: a timeout, a reset, a connection closed early, a body cut short.

    ClientConnectorError (DNS, refused, TLS, forbidden address) is a ClientOSError too, but another try meets
    the same answer.
    """
    if isinstance(err, aiohttp.ClientConnectorError):
        return False
    return isinstance(err, (aiohttp.ServerTimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                            aiohttp.ClientOSError, ConnectionResetError))


def _describe(err: BaseException) -> str:
    if isinstance(err, (ForbiddenAddress, ResolveFailure)):
        return str(err)
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, (ForbiddenAddress, ResolveFailure)):
        return str(os_error)  # aiohttp's own text of these reads "[None]"
    return f"{type(err).__name__}: {err}"


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """The first `cap` bytes of the body, and whether there was more."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            break
    data = b"".join(chunks)
    return data[:cap], len(data) > cap


@contextlib.asynccontextmanager
async def _paused(deadline: asyncio.Timeout) -> AsyncIterator[None]:
    """Stops the deadline's clock for a wait that is not the request's own (another host's slot, its policies)."""
    when = deadline.when()
    if when is None or deadline.expired():
        yield
        return
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline.reschedule(None)
    try:
        yield
    finally:
        if not deadline.expired():
            deadline.reschedule(when + loop.time() - start)


def _proxies(settings: FetchSettings) -> dict[str, str]:
    """Scheme -> proxy URL (and "no" -> NO_PROXY): the configured proxy for both schemes, else with `trust_env` the
    environment's, read once."""
    if settings.proxy:
        return {"http": settings.proxy, "https": settings.proxy}
    if settings.trust_env:
        found = urllib.request.getproxies_environment()
        return {k: v for k, v in found.items() if k in ("http", "https", "no")}
    return {}


def _host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower().rstrip(".")


class _HostLimits:
    """A semaphore of `per_host` slots per host, dropped when nobody holds or waits for it (crawls meet millions
    of hosts)."""

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._hosts: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    async def acquire(self, host: str) -> None:
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = (asyncio.Semaphore(self._per_host), [0])
        entry[1][0] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave(host)
            raise

    def release(self, host: str) -> None:
        self._hosts[host][0].release()
        self._leave(host)

    def _leave(self, host: str) -> None:
        users = self._hosts[host][1]
        users[0] -= 1
        if users[0] == 0:
            del self._hosts[host]


class _Slots:
    """The slots one URL holds: its current host's, then a global one; at most one host's at a time."""

    def __init__(self, hosts: _HostLimits, connections: asyncio.Semaphore) -> None:
        self._hosts, self._connections = hosts, connections
        self.host: str | None = None

    async def hold(self, host: str) -> None:
        if host == self.host:
            return
        self.release()
        await self._hosts.acquire(host)
        try:
            await self._connections.acquire()
        except BaseException:
            self._hosts.release(host)
            raise
        self.host = host

    def release(self) -> None:
        if self.host is not None:
            self._connections.release()
            self._hosts.release(self.host)
            self.host = None


class Fetcher:
    """One per event loop: a session, the policy caches of origins and the connection slots."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._allow = parse_networks(settings.allow_networks)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        s = self.settings
        # limit=0: our semaphores bound the image requests, and a request holding its slots must never queue in
        # the connector. Policy reads hold no slot (at most one per origin being looked up).
        dns = DnsResolver(s.nameservers, timeout_s=s.dns_timeout_s, retries=s.dns_retries, backoff_s=s.dns_backoff_s,
                          in_flight=s.dns_in_flight, negative_ttl_s=s.dns_negative_ttl_s)
        self._proxies = _proxies(s)
        trusted = frozenset(h for h in (_host_of(p) for p in self._proxies.values() if "://" in p) if h)
        self._resolver = GuardedResolver(dns, self._allow, trusted)
        connector = aiohttp.TCPConnector(resolver=self._resolver, use_dns_cache=False, limit=0,
                                         limit_per_host=0, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": s.user_agent},
            auto_decompress=True, trust_env=False,
        )
        self._hosts = _HostLimits(s.per_host)
        self._connections = asyncio.Semaphore(s.connections)
        # An origin's budget: as long as one URL's deadline, a read at most POLICY_TIMEOUT_S of it, and the
        # image fetch's retries and backoff for transient failures.
        policy = dict(timeout_s=s.deadline_s, attempt_timeout_s=min(POLICY_TIMEOUT_S, s.deadline_s),
                      retries=s.retries, backoff_s=s.backoff_s)
        self._robots = PolicyCache(ROBOTS_PATH, self._read_policy_file, RobotsPolicy.from_file, **policy)
        self._tdmrep = PolicyCache(TDMREP_PATH, self._read_policy_file, TdmPolicy.from_file, **policy)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._robots.close()
        await self._tdmrep.close()
        if self._session:
            await self._session.close()
        await self._resolver.close()  # the connector closes only a resolver it made itself

    def _check_target(self, url: str) -> tuple[str, str]:
        """(origin, host key) of a URL we may connect to, or FetchFailure."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchFailure(f"scheme {parts.scheme or '(none)'!r} is not http(s)")
        host = parts.hostname or ""
        if not host:
            raise FetchFailure("URL has no host")
        try:
            port = parts.port
        except ValueError as err:
            raise FetchFailure(f"bad port: {err}") from None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:  # IP literals never reach the resolver: judge them here
            reason = forbidden_reason(literal, self._allow)
            if reason:
                raise FetchFailure(f"address {host} is forbidden ({reason})")
        # Without userinfo: credentials in a crawled URL are not sent to robots.txt, nor make another host.
        authority = f"[{host}]" if ":" in host else host
        default = 443 if parts.scheme == "https" else 80
        origin = f"{parts.scheme}://{authority}" + (f":{port}" if port not in (None, default) else "")
        return origin, f"{authority}:{port or default}"

    @contextlib.asynccontextmanager
    async def _get(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET without following redirects, directly or through the URL's proxy.

        Through a proxy the connector only ever sees the proxy, so the target is judged here: its name resolved and
        every address checked, and the request sent to the checked address (Host header and TLS name kept), so that
        the proxy cannot resolve it to anything else.
        """
        assert self._session is not None
        proxy = self._proxy_for(url)
        if proxy is None:
            host = urlsplit(url).hostname or ""
            if self._resolver.trusts(host):
                await self._resolver.checked(host)  # the proxy's own name as a target (NO_PROXY) is judged too
            async with self._session.get(url, allow_redirects=False) as resp:
                yield resp
            return
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            ipaddress.ip_address(host)
            target, headers, tls_name = url, None, None  # a literal: judged by _check_target
        except ValueError:
            family, address = (await self._resolver.checked(host))[0]
            shown = f"[{address}]" if family == socket.AF_INET6 else address
            netloc = shown + (f":{parts.port}" if parts.port else "")
            target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            authority = parts.netloc.rpartition("@")[2]
            headers = {"Host": authority}
            tls_name = host if parts.scheme == "https" else None
        async with self._session.get(target, allow_redirects=False, proxy=proxy,
                                     proxy_auth=aiohttp.BasicAuth.from_url(URL(proxy)), headers=headers,
                                     server_hostname=tls_name) as resp:
            yield resp

    def _proxy_for(self, url: str) -> str | None:
        if not self._proxies:
            return None
        if "no" in self._proxies and urllib.request.proxy_bypass_environment(urlsplit(url).hostname or "",
                                                                             self._proxies):
            return None
        return self._proxies.get(urlsplit(url).scheme)

    async def _read_policy_file(self, url: str) -> PolicyFile:
        """A robots.txt or tdmrep.json: capped, redirects followed through the guard; never raises."""
        assert self._session is not None
        current = url
        status = 0
        for hop in range(POLICY_MAX_REDIRECTS + 1):
            try:
                if hop:
                    self._check_target(current)
                async with self._get(current) as resp:
                    status, location = resp.status, resp.headers.get("Location")
                    if status in REDIRECTS and location:
                        current = urljoin(current, location)
                        continue
                    if not 200 <= resp.status < 300:
                        return PolicyFile(url, resp.status)
                    body, truncated = await _read_capped(resp, POLICY_MAX_BYTES)
                    return PolicyFile(url, resp.status, whole_lines(body, truncated))
            except FetchFailure as err:
                return PolicyFile(url, error=f"redirect to {current}: {err}", permanent=True)
            except (aiohttp.ClientConnectorError, ForbiddenAddress, ResolveFailure) as err:
                # On the origin itself the image request would meet the same; on a redirect it is the file's fate.
                return PolicyFile(url, error=_describe(err), origin_unreachable=hop == 0)
            except (aiohttp.ClientError, OSError, ValueError) as err:
                return PolicyFile(url, error=_describe(err))
        return PolicyFile(url, status)  # a 3xx after five redirects: RFC 9309 lets us call it unavailable

    async def _check_policies(self, url: str, origin: str) -> None:
        """PolicyRefusal when robots.txt or tdmrep.json of the origin refuses `url`; FetchFailure when the origin
        cannot be reached at all."""
        s = self.settings
        if s.respect_robots_txt:
            robots = await self._robots.get(origin)
            if robots.origin_error:
                raise FetchFailure(f"{robots.origin_error} (reading robots.txt of {origin})")
            refusal = robots.refusal(url, s.agent_token)
            if refusal:
                raise PolicyRefusal(refusal)
        if s.respect_tdmrep:
            tdm = await self._tdmrep.get(origin)
            if tdm.origin_error:
                raise FetchFailure(f"{tdm.origin_error} (reading {TDMREP_PATH} of {origin})")
            refusal = tdm.refusal(url)
            if refusal:
                raise PolicyRefusal(refusal)

    async def _once(self, url: str, slots: _Slots, deadline: asyncio.Timeout) -> tuple[bytes, int, str]:
        s = self.settings
        current = url
        assert self._session is not None
        for hop in range(s.max_redirects + 1):
            origin, host = self._check_target(current)
            if hop or slots.host != host:
                async with _paused(deadline):
                    if hop:
                        await self._check_policies(current, origin)
                    await slots.hold(host)
            async with self._get(current) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchFailure(f"HTTP {resp.status} without Location", resp.status)
                    current = urljoin(current, location)
                    continue
                if resp.status != 200:
                    transient = resp.status in RETRY_STATUSES or resp.status >= 500
                    raise FetchFailure(f"HTTP {resp.status}", resp.status, transient,
                                       retry_after_s(resp.headers.get("Retry-After"), s.max_retry_after_s))
                if s.respect_x_robots_tag:
                    directive = opt_out(", ".join(resp.headers.getall("X-Robots-Tag", [])), s.agent_token)
                    if directive:
                        raise PolicyRefusal(f"X-Robots-Tag: {directive}")
                if s.respect_tdmrep:
                    refusal = tdm_header_refusal(resp.headers.getall("tdm-reservation", []),
                                                 resp.headers.getall("tdm-policy", []))
                    if refusal:
                        raise PolicyRefusal(refusal)
                declared = resp.content_length
                if declared is not None and declared > s.max_bytes:
                    raise FetchFailure(f"Content-Length {declared} is over the cap of {s.max_bytes} bytes", 200)
                body, over = await _read_capped(resp, s.max_bytes)
                if over:
                    raise FetchFailure(f"body is over the cap of {s.max_bytes} bytes", 200)
                return body, resp.status, current
        raise FetchFailure(f"more than {s.max_redirects} redirects")

    async def fetch(self, url: str) -> FetchResult:
        """Fetch one URL; never raises (but for cancellation)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        result = FetchResult(status="failed_to_download", final_url=url)
        slots = _Slots(self._hosts, self._connections)
        try:
            origin, host = self._check_target(url)
            await self._check_policies(url, origin)
            await slots.hold(host)
            async with asyncio.timeout(s.deadline_s) as deadline:
                for attempt in range(s.retries + 1):
                    result.attempts = attempt + 1
                    try:
                        body, status, final = await self._once(url, slots, deadline)
                        return FetchResult("success", body, "", status, final, result.attempts)
                    except FetchFailure as err:
                        result.error, result.http_status = str(err), err.http_status
                        if not err.transient:
                            return result
                        delay = err.retry_after if err.retry_after is not None else s.backoff_s * 2**attempt
                    except (aiohttp.ClientError, OSError) as err:
                        result.error, result.http_status = _describe(err), None
                        if not _transient(err):
                            return result
                        delay = s.backoff_s * 2**attempt
                    when = deadline.when()
                    if attempt == s.retries or (when is not None and loop.time() + delay >= when):
                        return result  # a retry that cannot finish in time would only hold the slots
                    await asyncio.sleep(delay)
        except PolicyRefusal as err:
            return FetchResult("skipped_by_policy", error=str(err), final_url=url, attempts=result.attempts)
        except FetchFailure as err:
            result.error, result.http_status = str(err), err.http_status
        except TimeoutError:
            result.error = f"total deadline of {s.deadline_s:g} s exceeded"
        except ValueError as err:
            result.error = f"{type(err).__name__}: {err}"
        finally:
            slots.release()
        return result
