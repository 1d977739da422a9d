"""Asset check results the assets report about their own output: blocking where wrong data would flow on (schemas,
one row per input, aligned files), warnings for figures outside a configurable band."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa


def spec(asset: str, name: str, description: str, blocking: bool = True) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description, blocking=blocking)


def _type(t: pa.DataType) -> str:
    # polars writes large (64-bit offset) and view variants of strings and binaries; they read the same.
    name = str(t)
    return {"large_string": "string", "string_view": "string", "large_binary": "binary"}.get(name, name)


def schema(asset: str, actual: pa.Schema, expected: pa.Schema) -> dg.AssetCheckResult:
    """The output has exactly the expected columns with the expected types, in order."""
    got = [(f.name, _type(f.type)) for f in actual]
    want = [(f.name, _type(f.type)) for f in expected]
    missing = [f"{n}: {t}" for n, t in want if (n, t) not in got]
    extra = [f"{n}: {t}" for n, t in got if (n, t) not in want]
    return dg.AssetCheckResult(
        asset_key=asset, check_name="schema", passed=got == want,
        description="columns and types as documented" if got == want else
        f"missing {missing or 'none'}, unexpected {extra or 'none'}",
        metadata={"columns": len(got)})


def holds(asset: str, name: str, passed: bool, description: str, **metadata: Any) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(asset_key=asset, check_name=name, passed=bool(passed), description=description,
                               metadata=metadata)


def band(asset: str, name: str, value: float, low: float, high: float, what: str) -> dg.AssetCheckResult:
    """A warning (never blocking) when value is outside [low, high]."""
    inside = low <= value <= high
    return dg.AssetCheckResult(
        asset_key=asset, check_name=name, passed=inside, severity=dg.AssetCheckSeverity.WARN,
        description=f"{what} {value:.3f} {'inside' if inside else 'outside'} [{low}, {high}]",
        metadata={"value": round(value, 4), "low": low, "high": high})
