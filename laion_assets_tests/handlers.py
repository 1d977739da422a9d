"""Request handlers for the loopback servers: the misbehaving web the download stage must survive."""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

Handler = Callable[[Any], None]


def respond(status: int, body: bytes = b"", headers: dict | None = None) -> Handler:
    def handler(h: Any) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return handler


def first_then(first: Handler, then: Handler) -> tuple[Handler, list[float]]:
    """`first` on the first request, `then` afterwards; also returns the request times."""
    calls: list[float] = []

    def handler(h: Any) -> None:
        calls.append(time.monotonic())
        (first if len(calls) == 1 else then)(h)
    return handler, calls


def drip(h: Any) -> None:
    """Ten bytes every 0.1 s of a declared 100 kB: only a total deadline stops it."""
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        for _ in range(100):
            h.wfile.write(b"x" * 10)
            h.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


def endless(h: Any) -> None:
    """No Content-Length and a body that does not end: only a byte cap stops it."""
    h.send_response(200)
    h.end_headers()
    try:
        for _ in range(10_000):
            h.wfile.write(b"\xff" * 65536)
    except OSError:
        pass
    h.close_connection = True


def cut_after(body: bytes, sent: int) -> Handler:
    """Declares the whole body, sends `sent` bytes, then closes the connection."""
    def handler(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:sent])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)
    return handler


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels, with almost no pixel data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


class Gauge:
    """Counts the requests a server is answering at once, and the most it ever answered at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = self.most = 0

    def __enter__(self) -> Gauge:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


def slow(then: Handler, delay_s: float, gauge: Gauge | None = None) -> Handler:
    """`then`, after `delay_s` seconds of silence (before the status line); counted by `gauge` while it runs."""
    def handler(h: Any) -> None:
        with gauge or contextlib.nullcontext():
            time.sleep(delay_s)
            try:
                then(h)
            except OSError:
                pass  # the client gave up first
    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return respond(status, headers={"Location": location})
