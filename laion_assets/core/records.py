"""Small JSON records: the manifests a stage returns (what it wrote, where, how many rows) and stores as JSON.

A record is a dataclass whose fields are JSON values, other dataclasses, or lists/dicts of them; `to_json` and
`from_json` round-trip it, nested dataclasses included (unknown keys are ignored, so a newer writer's file still
reads), so an IO manager can store any of them without knowing its shape. A stage that commits its record itself as
its completion marker (a download's `_manifest.json`) says where with `committed_at`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import orjson

R = TypeVar("R", bound="JsonRecord")
# What a pointer to a committed record holds (the IO manager keeps one where it would have kept the record).
POINTER = "committed_at"


class JsonRecord:
    """Mixin for dataclasses: `to_json()` / `from_json()`."""

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], data: bytes | str) -> R:
        return _build(cls, orjson.loads(data))

    def committed_at(self) -> str | None:
        """The storage key at which the stage that made this record committed it (its completion marker), or None
        when nobody stores it but the IO manager."""
        return None


def _build(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        known = {f.name for f in dataclasses.fields(hint)}
        return hint(**{k: _build(hints[k], v) for k, v in value.items() if k in known})
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        built = [_build(inner, v) for v in value]
        return tuple(built) if origin is tuple else built
    if origin is dict:
        _, inner = typing.get_args(hint) or (Any, Any)
        return {k: _build(inner, v) for k, v in value.items()}
    return value
