"""Progress: the `Log` every stage reports through, and the one throttle that keeps progress messages rare.

Stages report progress through a `Log` (a callable taking a line) or a counting callback; how often a line is worth
showing is the caller's business: an asset's log is stored in the instance's event log, where a line per batch of
every bucket of a crawl would be hundreds of millions of rows, so assets throttle theirs (`throttled`); the CLI
draws tqdm bars instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Log = Callable[[str], None]


class Throttle:
    """`due()` is true at most once per `every_s` seconds (the first call is due)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True


def throttled(log: Log, every_s: float = 30.0) -> Log:
    """A log that keeps at most one message per `every_s` seconds."""
    throttle = Throttle(every_s)

    def emit(message: str) -> None:
        if throttle.due():
            log(message)

    return emit
