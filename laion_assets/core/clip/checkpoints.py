"""Checkpoint files of the heads: a torch payload with its kind, and a JSON card beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def save(path: str | os.PathLike[str], payload: dict[str, Any], doc: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    Path(str(path) + ".json").write_text(json.dumps(doc, indent=2))


def load(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (it is {ckpt.get('kind')!r})")
    return ckpt


