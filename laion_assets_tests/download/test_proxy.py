"""Fetching through a forward proxy this test starts on 127.0.0.1, which counts what it forwards: the guard judges
every target before the proxy sees it, and the proxy is sent the address that was checked."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from laion_assets.core.download.fetch import Fetcher, FetchResult
from laion_assets.core.settings import FetchSettings
from laion_assets.offline.dns_server import LoopbackDns
from laion_assets.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets_tests.conftest import LoopbackServer

JPEG = jpeg_bytes(render(Scene("star", "blue", "white", "center"), (64, 48), seed=2))


class ForwardProxy:
    """An HTTP forward proxy on 127.0.0.1 (absolute-form GETs and CONNECT), one request per connection;
    `forwarded` lists (method, target, Host header) of what it passed on."""

    def __init__(self) -> None:
        self.forwarded: list[tuple[str, str, str]] = []
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            self.forwarded.append((method, target, headers.get("Host", "")))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
                return
            rest = target.split("://", 1)[1]
            authority, _, path = rest.partition("/")
            host, _, port = authority.partition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port or 80))
            kept = [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("connection", "proxy-connection")]
            request = "\r\n".join([f"{method} /{path} {version}", *kept, "Connection: close", "", ""])
            up_writer.write(request.encode("latin-1"))
            await up_writer.drain()
            await self._pipe(up_reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def web() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    server.static("/a.jpg", JPEG, "image/jpeg")
    yield server
    server.close()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    server = ForwardProxy()
    yield server
    server.close()


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDns]:
    with LoopbackDns({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "proxy.test": ["127.0.0.1"],
                      "inside.test": ["10.1.2.3"]}) as server:
        yield server


def fetch(urls: list[str], dns: LoopbackDns, **overrides) -> list[FetchResult]:
    settings = FetchSettings(**{"allow_networks": ("127.0.0.1/32",), "nameservers": (dns.address,),
                                "deadline_s": 5.0, "connect_timeout_s": 2.0, "retries": 0, **overrides})

    async def go() -> list[FetchResult]:
        async with Fetcher(settings) as f:
            return list(await asyncio.gather(*(f.fetch(u) for u in urls)))

    return asyncio.run(go())


def test_requests_go_through_the_proxy_to_the_checked_address(web, proxy, dns):
    (r,) = fetch([f"http://img.test:{web.port}/a.jpg"], dns, proxy=proxy.url)
    assert r.status == "success" and r.body == JPEG and r.final_url == f"http://img.test:{web.port}/a.jpg"
    # robots.txt, tdmrep.json and the image, each sent to the address the guard checked, the name in Host.
    assert sorted(proxy.forwarded) == sorted(
        ("GET", f"http://127.0.0.1:{web.port}{path}", f"img.test:{web.port}")
        for path in ("/robots.txt", "/.well-known/tdmrep.json", "/a.jpg"))


def test_the_proxy_never_reaches_a_forbidden_target(web, proxy, dns):
    # The proxy is trusted (here a name resolving to loopback with no network allowed); its targets are not.
    # The proxy's own name as a target is judged like any other.
    urls = [f"http://img.test:{web.port}/a.jpg", f"http://127.0.0.2:{web.port}/a.jpg", "http://inside.test/a.jpg",
            "http://169.254.169.254/latest/meta-data/", f"http://proxy.test:{web.port}/a.jpg"]
    results = fetch(urls, dns, proxy=f"http://proxy.test:{proxy.port}", allow_networks=())
    assert [r.status for r in results] == ["failed_to_download"] * 5
    assert all("forbidden" in r.error for r in results), [r.error for r in results]
    assert proxy.forwarded == []
    # The same proxy by name reaches allowed targets.
    (ok,) = fetch([f"http://img.test:{web.port}/a.jpg"], dns, proxy=f"http://proxy.test:{proxy.port}")
    assert ok.status == "success" and len(proxy.forwarded) == 3


def test_https_targets_go_through_connect_to_the_checked_address(web, proxy, dns):
    # The loopback server speaks plain HTTP, so TLS fails after the tunnel: what matters is where the tunnel went.
    (r,) = fetch([f"https://img.test:{web.port}/a.jpg"], dns, proxy=proxy.url, respect_robots_txt=False,
                 respect_tdmrep=False)
    assert r.status == "failed_to_download"
    assert proxy.forwarded == [("CONNECT", f"127.0.0.1:{web.port}", f"img.test:{web.port}")]


def test_trust_env_takes_the_environment_proxy_and_no_proxy(web, proxy, dns, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "other.test")
    policies = dict(respect_robots_txt=False, respect_tdmrep=False)
    urls = [f"http://img.test:{web.port}/a.jpg", f"http://other.test:{web.port}/a.jpg"]
    assert [r.status for r in fetch(urls, dns, **policies)] == ["success"] * 2
    assert proxy.forwarded == []  # not trusted unless asked
    assert [r.status for r in fetch(urls, dns, trust_env=True, **policies)] == ["success"] * 2
    assert proxy.forwarded == [("GET", f"http://127.0.0.1:{web.port}/a.jpg", f"img.test:{web.port}")]


def test_proxy_setting_is_checked():
    with pytest.raises(ValueError, match="http://"):
        FetchSettings(proxy="socks5://127.0.0.1:1080")
