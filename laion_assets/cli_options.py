"""Click options generated from the stages' settings dataclasses (the same fields, defaults and help as the
Dagster config); `core.settings.build` turns a command's arguments back into settings."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from laion_assets.core.settings import scalar_fields


def _option(field: dataclasses.Field, hint: Any) -> Callable:
    name = field.metadata.get("cli") or "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": field.metadata["help"], "show_default": True}
    if hint is bool:
        flag = name[2:]
        return click.option(f"--{flag}/--no-{flag}", field.name, default=field.default, **kwargs)
    if typing.get_origin(hint) is tuple:
        return click.option(name, field.name, multiple=True, default=field.default,
                            type=typing.get_args(hint)[0], **kwargs)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return click.option(name, field.name, type=hint, default=field.default, **kwargs)


def options(settings_cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: one option per scalar field of settings_cls (its name in `cli` metadata or --field-name)."""
    hints = typing.get_type_hints(settings_cls)
    wanted = [f for f in scalar_fields(settings_cls) if f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        for f in reversed(wanted):
            command = _option(f, hints[f.name])(command)
        return command

    return decorate
