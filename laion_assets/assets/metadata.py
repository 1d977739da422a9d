"""Turning a stage's report (plain dicts) into Dagster materialization metadata.

(The asset functions of this package carry no return annotation: Dagster reads one as the type of the output
the IO manager stores, and `MaterializeResult` as "no value".)"""

from __future__ import annotations

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
