"""Query vectors from text and images, with the CLIP that made the index's embeddings, loaded once."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from laion_assets.core.settings import ModelSettings


class BadQuery(ValueError):
    """A query the service cannot encode (the message goes back to the client with a 400)."""


class QueryEncoder:
    """The embedding CLIP of the model settings (ViT-L/14 in the laion preset, the small multilingual CLIP in the
    small one), loaded on the first query and then kept."""

    def __init__(self, settings: ModelSettings, max_pixels: int = 89_478_485) -> None:
        self.settings = settings
        self.max_pixels = max_pixels
        self._model: Any = None
        self._lock = threading.Lock()

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from laion_assets.core.clip.models import load_clip, pick_device
                from laion_assets.core.clip.registry import resolve

                spec = resolve(self.settings, check=False).embed  # open_clip's weights: open_clip's cache
                self._model = load_clip(spec, pick_device(self.settings.device))
            return self._model

    def text(self, text: str) -> np.ndarray:
        return self.model().encode_texts([text])[0]

    def image(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > self.max_pixels:  # checked from the header, before decoding
                raise BadQuery(f"image of {img.width}x{img.height} pixels is over the {self.max_pixels} pixel limit")
            img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise BadQuery(f"not a readable image: {err}") from None
        model = self.model()
        return model.encode_pixels(model.preprocess(img).unsqueeze(0))[0]
