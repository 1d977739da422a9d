"""Turning downloaded bytes into a dataset image: sniff, bound, decode, resize, encode, hash.

Resize modes follow img2dataset so that its readers and settings carry over:
`no` (keep size), `keep_ratio` (smaller side to image_size), `keep_ratio_largest` (larger side to
image_size), `center_crop` (smaller side to image_size, then a centred square crop) and `border` (fit in
an image_size square, padded with white).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from laion_assets.core.download.phash import perceptual_hash
from laion_assets.core.settings import ENCODE_FORMATS, ResizeSettings

# Decoded only when the bytes say they are one of these (never trusting Content-Type).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


class ImageError(ValueError):
    """An image that cannot become a sample; the message is recorded per row."""


@dataclass
class Processed:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str
    phash: str
    original: bytes | None = None


def sniff(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _target_size(w: int, h: int, settings: ResizeSettings) -> tuple[int, int]:
    s, mode = settings.image_size, settings.resize_mode
    if mode == "no":
        return w, h
    if mode in ("keep_ratio", "center_crop"):
        scale = s / min(w, h)
    else:  # border, keep_ratio_largest
        scale = s / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def pad_square(img: Image.Image, side: int | None = None) -> Image.Image:
    """img centred on a white square of `side` (default: its longer side), as the `border` mode stores it."""
    side = side or max(img.size)
    if img.size == (side, side):
        return img
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def _to_rgb(img: Image.Image) -> Image.Image:
    """Decoded RGB pixels; transparency is matted onto white, as img2dataset does."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def process_image(data: bytes, settings: ResizeSettings) -> Processed:
    """Decode, check, resize and encode one image; ImageError says why it cannot be used."""
    fmt = sniff(data)
    if fmt is None or fmt not in ALLOWED_FORMATS:
        raise ImageError(f"not an allowed image format (leading bytes {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > settings.max_pixels:
                raise ImageError(f"image of {w}x{h} pixels is over the budget of {settings.max_pixels}")
            if min(w, h) < settings.min_image_size:
                raise ImageError(f"image of {w}x{h} is under min_image_size {settings.min_image_size}")
            if settings.max_aspect_ratio and max(w, h) / max(1, min(w, h)) > settings.max_aspect_ratio:
                raise ImageError(f"aspect ratio of {w}x{h} is over {settings.max_aspect_ratio}")
            tw, th = _target_size(w, h, settings)
            if fmt == "JPEG" and settings.resize_mode != "no":
                img.draft("RGB", (tw, th))  # decode at a reduced scale: the big win for large JPEGs
            rotated = img.getexif().get(0x0112, 1) != 1  # EXIF orientation: rare, and transposing copies
            img = _to_rgb(img)
            if rotated:
                ImageOps.exif_transpose(img, in_place=True)
            if img.size != (w, h) and settings.resize_mode != "no":
                tw, th = _target_size(img.width, img.height, settings)
            if (tw, th) != img.size:
                # As img2dataset: area averaging to shrink (after the JPEG draft did the coarse part), Lanczos
                # to enlarge. Area is also the fastest filter that does not alias.
                shrink = tw * th < img.width * img.height
                img = img.resize((tw, th), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
            s = settings.image_size
            if settings.resize_mode == "center_crop":
                left, top = (img.width - s) // 2, (img.height - s) // 2
                img = img.crop((left, top, left + s, top + s))
            elif settings.resize_mode == "border":
                img = pad_square(img, s)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own header check fired first
        raise ImageError(f"image is over the budget of {settings.max_pixels} pixels: {err}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"cannot decode {fmt}: {err}") from err
    buf = io.BytesIO()
    kind = ENCODE_FORMATS[settings.encode_format]
    if kind == "PNG":
        img.save(buf, format=kind)
    else:
        img.save(buf, format=kind, quality=settings.encode_quality)
    return Processed(
        data=buf.getvalue(),
        width=img.width,
        height=img.height,
        original_width=w,
        original_height=h,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=perceptual_hash(img),
        original=data if settings.keep_original else None,
    )
