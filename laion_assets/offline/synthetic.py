"""A small synthetic image-caption world: coloured shapes at positions on coloured backgrounds.

Captions describe what the image shows (in English, German, French or Spanish), so that image-text
similarity means something for the small models the project trains offline, and so that the sample
crawl's alt texts carry real languages for CLD3. Everything is a pure function of a seed.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
POSITIONS = ("left", "right", "top", "bottom", "center")

_WORDS = {
    "de": {
        "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern",
        "red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "lila",
        "orange": "orange", "white": "weiß", "black": "schwarz",
        "left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "in der Mitte",
    },
    "fr": {
        "circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile",
        "red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
        "orange": "orange", "white": "blanc", "black": "noir",
        "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "center": "au centre",
    },
    "es": {
        "circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella",
        "red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
        "orange": "naranja", "white": "blanco", "black": "negro",
        "left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
        "center": "en el centro",
    },
}
LANGUAGES = ("en", "de", "fr", "es")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str

    def caption(self, language: str = "en") -> str:
        if language == "en":
            where = "in the center" if self.position == "center" else f"at the {self.position}"
            return f"a {self.color} {self.shape} {where} on a {self.background} background"
        w = _WORDS[language]
        shape, color, bg, pos = w[self.shape], w[self.color], w[self.background], w[self.position]
        if language == "de":
            return f"Ein Bild mit einem {shape} in der Farbe {color}, {pos}, vor einem Hintergrund in {bg}"
        if language == "fr":
            return f"Une image avec un {shape} de couleur {color}, {pos}, sur un fond {bg}"
        return f"Una imagen con un {shape} de color {color}, {pos}, sobre un fondo {bg}"


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(rng.choice(SHAPES), color, background, rng.choice(POSITIONS))


def render(scene: Scene, size: tuple[int, int], seed: int, watermark: str | None = None) -> Image.Image:
    """The scene as an RGB image with photo-like noise (so that JPEG sizes and decode costs are real)."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, COLORS[scene.background])
    # Seeded noise (Pillow's effect_noise is not): the same seed gives the same bytes everywhere.
    grain = np.random.default_rng(seed).normal(128, 40, (h, w)).clip(0, 255).astype(np.uint8)
    img = Image.blend(img, Image.fromarray(grain).convert("RGB"), 0.15)
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.18, 0.26))
    cx = {"left": w * 0.25, "right": w * 0.75}.get(scene.position, w * 0.5) + rng.uniform(-0.04, 0.04) * w
    cy = {"top": h * 0.27, "bottom": h * 0.73}.get(scene.position, h * 0.5) + rng.uniform(-0.04, 0.04) * h
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.regular_polygon((cx, cy, r), 5, fill=fill)
        draw.regular_polygon((cx, cy, r * 0.9), 5, rotation=36, fill=fill)
    if watermark:
        # A stock-photo style mark: large light text across the picture, as the watermark head must find.
        font = ImageFont.load_default(size=max(10, h // 7))
        r, g, b = COLORS[scene.background]
        shade = (30, 30, 30) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (235, 235, 235)
        for i in range(2):
            draw.text((rng.uniform(0, w * 0.3), h * (0.15 + 0.45 * i)), watermark, fill=shade, font=font)
    return img.filter(ImageFilter.SMOOTH)


def jpeg_bytes(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
