"""Dagster `Config` classes and resources generated from the stages' settings dataclasses, so that the launchpad
offers the same fields, defaults and help as the CLI; `core.settings.build` turns a config back into settings."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from laion_assets.core.settings import scalar_fields


def _pydantic_field(field: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    default = field.default
    if typing.get_origin(hint) is tuple:  # config has lists, not tuples
        hint, default = list[typing.get_args(hint)[0]], list(default)
    return hint, Field(default=default, description=field.metadata["help"])


def config_class(name: str, *settings_classes: type, base: type = dg.Config, exclude: tuple[str, ...] = (),
                 doc: str | None = None) -> Any:
    """A Config (or ConfigurableResource) subclass with one field per scalar field of the settings classes."""
    fields: dict[str, tuple[Any, Any]] = {}
    for settings_cls in settings_classes:
        hints = typing.get_type_hints(settings_cls)
        fields.update({f.name: _pydantic_field(f, hints[f.name]) for f in scalar_fields(settings_cls)
                       if f.name not in exclude})
    cls = create_model(name, __base__=base, __module__=base.__module__, **fields)
    cls.__doc__ = doc or settings_classes[0].__doc__
    return cls
