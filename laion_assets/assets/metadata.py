"""Turning a stage's report (plain dicts) into Dagster materialization metadata.

(The asset functions of this package carry no return annotation: Dagster reads one as the type of the output
the IO manager stores, and `MaterializeResult` as "no value".)"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dagster as dg


def preview_table(rows: list[dict[str, Any]], columns: list[str] | None = None, width: int = 80) -> dg.MetadataValue:
    """A small Markdown table of the first rows (long values shortened)."""
    if not rows:
        return dg.MetadataValue.md("_(no rows)_")
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        s = str(v).replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def to_metadata(report: dict[str, Any]) -> dict[str, Any]:
    """Numbers and strings stay as they are; lists and dicts become JSON metadata."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, bool) or isinstance(value, (int, float, str)):
            out[key] = value
        elif value is None:
            continue
        else:
            out[key] = dg.MetadataValue.json(value)
    return out


def throttled(log: Callable[[str], None], every_s: float = 30.0) -> Callable[[str], None]:
    """A log that keeps at most one message per `every_s` seconds: progress lines are stored in the instance's event
    log, and a line per batch of every bucket of a crawl would be hundreds of millions of rows."""
    last = [float("-inf")]

    def emit(message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            log(message)

    return emit
