"""Checkpoint files of the heads: a torch payload with its kind, and a JSON card beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from laion_assets.core.storage import atomic_path


def save(path: str | os.PathLike[str], payload: dict[str, Any], doc: dict[str, Any]) -> None:
    """The payload at path and its card at path + ".json", each committed atomically, the card first: the payload
    is what says the checkpoint exists (a kill between the two leaves no payload without its card)."""
    with atomic_path(str(path) + ".json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2))
    # Into an open file, not a path: torch names the archive inside after the file, and a temporary's random name
    # would make the bytes (the checkpoint's sha256, its data version) differ from one save to the next.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)


def load(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (it is {ckpt.get('kind')!r})")
    return ckpt


