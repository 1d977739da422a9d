"""A small DNS server on 127.0.0.1 (UDP) for the tests and the download benchmark: names answer from a table, and a
behaviour decides per query whether to answer, answer late, drop it, SERVFAIL or NXDOMAIN.

Only what a stub resolver asks is understood: one question, A or AAAA (anything else is answered NOERROR with no
records); the additional section (c-ares sends an EDNS OPT record) is ignored. Names outside the table are NXDOMAIN.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
ACTIONS = ("answer", "drop", "servfail", "nxdomain")


@dataclass(frozen=True)
class Action:
    """What the server does with one query: `kind` one of ACTIONS, after `delay_s` seconds."""

    kind: str = "answer"
    delay_s: float = 0.0


# (name, query type, how many times this name and type were asked before, this one included) -> Action
Behaviour = Callable[[str, int, int], Action]


def always_answer(name: str, qtype: int, nth: int) -> Action:
    return Action()


def fail_first(count: int, kind: str = "drop", names: Iterable[str] | None = None) -> Behaviour:
    """The first `count` queries of each name (of `names`, or of every name) and type dropped or SERVFAILed."""
    chosen = None if names is None else {n.lower().rstrip(".") for n in names}

    def behave(name: str, qtype: int, nth: int) -> Action:
        if nth <= count and (chosen is None or name in chosen):
            return Action(kind)
        return Action()

    return behave


def _parse_question(packet: bytes) -> tuple[int, int, str, int, bytes] | None:
    """(id, flags, name, qtype, question bytes) of a query, or None when it is not one we understand."""
    if len(packet) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    labels, pos = [], 12
    while True:
        if pos >= len(packet):
            return None
        length = packet[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0 or pos + length > len(packet):
            return None
        labels.append(packet[pos:pos + length].decode("ascii", "replace"))
        pos += length
    if pos + 4 > len(packet):
        return None
    qtype, _ = struct.unpack("!HH", packet[pos:pos + 4])
    return qid, flags, ".".join(labels).lower(), qtype, packet[12:pos + 4]


def _reply(qid: int, flags: int, question: bytes, rcode: int, records: list[bytes]) -> bytes:
    # QR, the query's opcode and RD, AA and RA, the rcode.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | rcode
    return struct.pack("!HHHHHH", qid, out_flags, 1, len(records), 0, 0) + question + b"".join(records)


def _record(qtype: int, address: str, ttl: int) -> bytes:
    family = socket.AF_INET if qtype == TYPE_A else socket.AF_INET6
    data = socket.inet_pton(family, address)
    # 0xC00C: the name is the question's (a compression pointer to offset 12).
    return struct.pack("!HHHIH", 0xC00C, qtype, CLASS_IN, ttl, len(data)) + data


class LoopbackDns:
    """A threaded UDP DNS server on 127.0.0.1; `records` maps names to their addresses (IPv4 and IPv6 alike),
    `queries` counts what was asked per (name, query type)."""

    def __init__(self, records: Mapping[str, Iterable[str]] | None = None, ttl: int = 300,
                 behave: Behaviour = always_answer) -> None:
        self.records = {k.lower().rstrip("."): list(v) for k, v in (records or {}).items()}
        self.ttl = ttl
        self.behave = behave
        self.queries: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self._thread.start()

    def asked(self, name: str) -> int:
        """Queries of `name`, all types."""
        with self._lock:
            return sum(n for (q, _), n in self.queries.items() if q == name)

    def reset(self) -> None:
        with self._lock:
            self.queries.clear()

    def _serve(self) -> None:
        while not self._closed:
            try:
                packet, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            parsed = _parse_question(packet)
            if parsed is None:
                continue
            qid, flags, name, qtype, question = parsed
            with self._lock:
                self.queries[(name, qtype)] += 1
                nth = self.queries[(name, qtype)]
            action = self.behave(name, qtype, nth)
            if action.kind == "drop":
                continue
            if action.kind == "servfail":
                reply = _reply(qid, flags, question, SERVFAIL, [])
            elif action.kind == "nxdomain" or name not in self.records:
                reply = _reply(qid, flags, question, NXDOMAIN, [])
            else:
                wanted = socket.AF_INET if qtype == TYPE_A else socket.AF_INET6 if qtype == TYPE_AAAA else None
                addresses = [a for a in self.records[name]
                             if wanted is not None and (":" in a) == (wanted == socket.AF_INET6)]
                reply = _reply(qid, flags, question, NOERROR, [_record(qtype, a, self.ttl) for a in addresses])
            if action.delay_s > 0:
                timer = threading.Timer(action.delay_s, self._send, (reply, peer))
                timer.daemon = True
                timer.start()
            else:
                self._send(reply, peer)

    def _send(self, reply: bytes, peer: tuple[str, int]) -> None:
        try:
            self._sock.sendto(reply, peer)
        except OSError:
            pass  # closed meanwhile

    def close(self) -> None:
        self._closed = True
        # Wakes recvfrom: shutting down a UDP socket is not portable, a datagram to ourselves is.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"", ("127.0.0.1", self.port))
        self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> LoopbackDns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
