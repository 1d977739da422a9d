"""Asynchronous name resolution for the image fetcher: c-ares (aiodns) instead of getaddrinfo in a thread pool.

At crawl scale a download meets a new host name every few URLs; the stub resolver in the default thread pool
queues them behind a handful of threads, and one lost datagram becomes a permanent failure. Here:

- Queries go straight to the configured name servers (`nameservers`, IP[:PORT]; default: /etc/resolv.conf's), as
  c-ares getaddrinfo (the hosts file too, CNAMEs followed), A and AAAA side by side, each family retried on its
  own; once one has addresses the other gets `timeout_s` more. Search domains are off: a crawled host name is
  absolute, and `intranet` must not become `intranet.corp.example`.
- A query is given `timeout_s` to answer, then another is sent beside it, at most `retries + 1` per family. c-ares
  1.34 gives up on a query after a few times the server's observed latency (250 ms at least) and drops a late
  answer; within `timeout_s` such a query is asked again at once, uncounted (a recursive resolver still working on
  the name answers the repeat when it is done). A server failure (SERVFAIL, REFUSED, the server unreachable) is
  retried after a jittered backoff doubling from `backoff_s`. NXDOMAIN and a name without addresses are answers,
  never retried.
- Answers are cached for their TTL (capped at MAX_TTL_S), NXDOMAIN and no-address answers for `negative_ttl_s`, a
  lookup whose retries were all spent for TEMPORARY_TTL_S (so that the URLs of a host whose name servers are down
  do not each spend the whole retry budget again).
- Concurrent lookups of one name share one; at most `in_flight` names are being looked up at once.

A failure is a ResolveFailure whose `reason` is one of REASONS (the start of its message), so that a row's error
says whether another run may succeed: `dns_temporary` may, `dns_nxdomain`, `dns_no_address` and `dns_error` not.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiodns
import pycares

from laion_assets.core.download.guard import parse_nameserver

DNS_TEMPORARY = "dns_temporary"
DNS_NXDOMAIN = "dns_nxdomain"
DNS_NO_ADDRESS = "dns_no_address"
DNS_ERROR = "dns_error"
REASONS = (DNS_TEMPORARY, DNS_NXDOMAIN, DNS_NO_ADDRESS, DNS_ERROR)

MAX_TTL_S = 3600.0
TEMPORARY_TTL_S = 5.0
CACHE_SIZE = 100_000  # names per process; the oldest entry goes first
FAMILIES = (socket.AF_INET, socket.AF_INET6)  # IPv4 first: the more often reachable

_errno = pycares.errno
_NXDOMAIN = frozenset({_errno.ARES_ENOTFOUND, _errno.ARES_ENONAME})
_NO_ADDRESS = frozenset({_errno.ARES_ENODATA})
# Worth another query: the server did not answer, said it is failing, or could not be reached.
_TEMPORARY = frozenset({_errno.ARES_ETIMEOUT, _errno.ARES_ESERVFAIL, _errno.ARES_EREFUSED, _errno.ARES_ECONNREFUSED,
                        _errno.ARES_EBADRESP, _errno.ARES_EOF})
_SILENT = frozenset({_errno.ARES_ETIMEOUT})  # no answer at all: already waited, no backoff on top


class ResolveFailure(OSError):
    """A name did not resolve; `reason` is one of REASONS, `transient` whether another try later may succeed."""

    def __init__(self, reason: str, host: str, detail: str) -> None:
        super().__init__(f"{reason}: cannot resolve {host}: {detail}")
        self.reason = reason
        self.host = host
        self.transient = reason == DNS_TEMPORARY


@dataclass(frozen=True)
class Answer:
    """The addresses of a name as (family, address) pairs, in the resolver's order."""

    addresses: tuple[tuple[int, str], ...]
    ttl_s: float


class DnsResolver:
    """One per event loop: the c-ares channel, the cache and the bound on lookups in flight."""

    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 1.0, retries: int = 3,
                 backoff_s: float = 0.1, in_flight: int = 64, negative_ttl_s: float = 30.0) -> None:
        self._timeout_s, self._retries, self._backoff_s = timeout_s, retries, backoff_s
        self._negative_ttl_s = negative_ttl_s
        # tries=1: the retries are ours (hedged, counted, backed off).
        self._resolver = aiodns.DNSResolver(
            nameservers=[parse_nameserver(n) for n in nameservers] or None,
            timeout=timeout_s * (retries + 1), tries=1, flags=pycares.ARES_FLAG_NOSEARCH)
        self._cache: dict[str, tuple[float, Answer | ResolveFailure]] = {}
        self._pending: dict[str, asyncio.Task[Answer]] = {}
        self._slots = asyncio.Semaphore(in_flight)
        self.queries = 0  # sent, for the tests and the benchmark

    async def resolve(self, host: str) -> Answer:
        """The addresses of `host`, or ResolveFailure."""
        key = host.lower().rstrip(".")
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > time.monotonic():
                if isinstance(hit[1], ResolveFailure):
                    raise hit[1]
                return hit[1]
            del self._cache[key]
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = asyncio.create_task(self._lookup(key))
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # Shielded: one waiter giving up (its deadline) must not cancel the lookup others wait for.
        return await asyncio.shield(task)

    async def _lookup(self, host: str) -> Answer:
        async with self._slots:
            try:
                answer = await self._families(host)
            except ResolveFailure as err:
                ttl = TEMPORARY_TTL_S if err.transient else self._negative_ttl_s
                self._remember(host, time.monotonic() + ttl, err)
                raise
            if answer.ttl_s > 0:
                self._remember(host, time.monotonic() + answer.ttl_s, answer)
            return answer

    def _remember(self, host: str, until: float, value: Answer | ResolveFailure) -> None:
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[host] = (until, value)

    async def _families(self, host: str) -> Answer:
        """A and AAAA looked up side by side, each with its own retries (one getaddrinfo for both would turn a lost A
        beside an empty AAAA into "no address"). Once one family has addresses the other gets `timeout_s` more."""
        loop = asyncio.get_running_loop()
        tasks = {asyncio.create_task(self._hedged(host, family)): family for family in FAMILIES}
        found: dict[int, Answer | ResolveFailure] = {}
        pending = set(tasks)
        grace_until: float | None = None
        try:
            while pending:
                wait = None if grace_until is None else max(0.0, grace_until - loop.time())
                done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                errors = {task: task.exception() for task in done}  # each read, so none is "never retrieved"
                for task, err in errors.items():
                    if isinstance(err, ResolveFailure) and err.reason == DNS_NXDOMAIN:
                        raise err  # the name does not exist, whatever the other family says
                    if err is not None and not isinstance(err, ResolveFailure):
                        raise err
                    found[tasks[task]] = err if err is not None else task.result()
                    if err is None and grace_until is None:
                        grace_until = loop.time() + self._timeout_s
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        answers = [a for a in (found.get(f) for f in FAMILIES) if isinstance(a, Answer)]
        if answers:
            return Answer(tuple(x for a in answers for x in a.addresses), min(a.ttl_s for a in answers))
        failures = [f for f in found.values() if isinstance(f, ResolveFailure)]
        temporary = next((f for f in failures if f.transient), None)
        if temporary is not None:
            raise temporary
        raise failures[0] if failures else ResolveFailure(DNS_TEMPORARY, host, "no answer")

    async def _hedged(self, host: str, family: int) -> Answer:
        """Queries of one family until one answers.

        A query is ours for `timeout_s`: if c-ares gives up on it sooner (its timeouts follow the server's observed
        latency, 250 ms at least, and a late answer is then dropped) it is asked again at once, uncounted; after
        `timeout_s` of silence another query is counted and sent beside it. A server failure (SERVFAIL, REFUSED)
        ends a query; the next one follows a jittered backoff. At most `retries + 1` counted queries.
        """
        loop = asyncio.get_running_loop()
        pending: dict[asyncio.Future[pycares.AddrInfoResult], float] = {}  # -> when its counted query began
        counted = 0
        last: BaseException | None = None
        try:
            while True:
                if not pending:
                    if counted > self._retries:
                        detail = _strerror(last) if last is not None else "no answer"
                        raise ResolveFailure(DNS_TEMPORARY, host, f"{detail} ({counted} queries)")
                    pending[self._query(host, family)] = loop.time()
                    counted += 1
                hedge = max(pending.values()) + self._timeout_s if counted <= self._retries else None
                wait = None if hedge is None else max(0.0, hedge - loop.time())
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    pending[self._query(host, family)] = loop.time()
                    counted += 1
                    continue
                for fut in done:
                    began = pending.pop(fut)
                    err = fut.exception()
                    if err is None:
                        return _answer(host, fut.result())
                    code = err.args[0] if isinstance(err, aiodns.error.DNSError) and err.args else None
                    if code in _NXDOMAIN:
                        raise ResolveFailure(DNS_NXDOMAIN, host, "no such name (NXDOMAIN)")
                    if code in _NO_ADDRESS:
                        raise ResolveFailure(DNS_NO_ADDRESS, host, "the name has no address of this family")
                    if code not in _TEMPORARY:
                        raise ResolveFailure(DNS_ERROR, host, _strerror(err))
                    last = err
                    if code in _SILENT:
                        if loop.time() - began < self._timeout_s:
                            pending[self._query(host, family)] = began  # still within its time: ask again
                    elif not pending and counted <= self._retries:
                        delay = self._backoff_s * 2 ** (counted - 1)
                        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        finally:
            for fut in pending:
                fut.cancel()

    def _query(self, host: str, family: int) -> asyncio.Future[pycares.AddrInfoResult]:
        self.queries += 1
        return self._resolver.getaddrinfo(host, family=family, type=socket.SOCK_STREAM)

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Cancels c-ares's own queries too (hedged ones still listening): their callbacks must run before the loop
        # closes.
        await self._resolver.close()


def _strerror(err: BaseException) -> str:
    if isinstance(err, aiodns.error.DNSError) and len(err.args) > 1:
        return str(err.args[1])
    return f"{type(err).__name__}: {err}"


def _answer(host: str, result: pycares.AddrInfoResult) -> Answer:
    addresses: list[tuple[int, str]] = []
    ttls: list[float] = []
    for node in result.nodes:
        address = node.addr[0].decode() if isinstance(node.addr[0], bytes) else node.addr[0]
        if (node.family, address) not in addresses:
            addresses.append((node.family, address))
        ttls.append(float(node.ttl))
    if not addresses:
        raise ResolveFailure(DNS_NO_ADDRESS, host, "the name has no address")
    return Answer(tuple(addresses), min(min(ttls), MAX_TTL_S))
