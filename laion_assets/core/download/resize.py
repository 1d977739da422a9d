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

from PIL import Image, ImageFilter, ImageOps

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


def _keeps_size(w: int, h: int, settings: ResizeSettings) -> bool:
    """resize_only_if_bigger and the image already within image_size: img2dataset then neither resizes it nor
    pads or crops it."""
    if not settings.resize_only_if_bigger or settings.resize_mode == "no":
        return False
    side = min(w, h) if settings.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    return side <= settings.image_size


def _target_size(w: int, h: int, settings: ResizeSettings) -> tuple[int, int]:
    s, mode = settings.image_size, settings.resize_mode
    if mode == "no" or _keeps_size(w, h, settings):
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


Box = tuple[float, float, float, float]


def blur_boxes(img: Image.Image, boxes: list[Box] | list[list[float]]) -> Image.Image:
    """Boxes [x0, y0, x1, y1] in coordinates relative to the image blurred as img2dataset's BoundingBoxBlurrer
    (after ImageNet's face obfuscation): each box grown by a tenth of its longer side on every side, a Gaussian
    blur of sigma a tenth of the largest box's longer side, pasted inside the boxes only."""
    if not boxes:
        return img
    w, h = img.size
    mask = Image.new("L", (w, h), 0)
    largest = 0
    regions = []
    for box in boxes:
        x0, y0, x1, y1 = (int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h))
        side = max(x1 - x0, y1 - y0)
        largest = max(largest, side)
        grow = int(0.1 * side)
        regions.append((min(max(x0 - grow, 0), w - 1), min(max(y0 - grow, 0), h - 1),
                        min(max(x1 + grow, 0), w - 1), min(max(y1 + grow, 0), h - 1)))
    for region in regions:
        if region[2] > region[0] and region[3] > region[1]:
            mask.paste(255, region)
    blurred = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.1 * largest)))
    return Image.composite(blurred, img, mask)


def _header_checks(w: int, h: int, settings: ResizeSettings) -> None:
    if w * h > settings.max_pixels:
        raise ImageError(f"image of {w}x{h} pixels is over the budget of {settings.max_pixels}")
    if min(w, h) < settings.min_image_size:
        raise ImageError(f"image of {w}x{h} is under min_image_size {settings.min_image_size}")
    if settings.max_aspect_ratio and max(w, h) / max(1, min(w, h)) > settings.max_aspect_ratio:
        raise ImageError(f"aspect ratio of {w}x{h} is over {settings.max_aspect_ratio}")


def _as_is(data: bytes, fmt: str, settings: ResizeSettings) -> Processed:
    """disable_all_reencoding: the downloaded bytes themselves, after the header's checks; decoded only at a
    small scale for the perceptual hash the near-duplicate dedup needs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            _header_checks(w, h, settings)
            if fmt == "JPEG":
                img.draft("RGB", (64, 64))
            small = _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image is over the budget of {settings.max_pixels} pixels: {err}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"cannot decode {fmt}: {err}") from err
    return Processed(data=data, width=w, height=h, original_width=w, original_height=h,
                     sha256=hashlib.sha256(data).hexdigest(), phash=perceptual_hash(small),
                     original=data if settings.keep_original else None)


def process_image(data: bytes, settings: ResizeSettings, boxes: list[Box] | list[list[float]] | None = None,
                  ) -> Processed:
    """Decode, check, resize (blurring `boxes`, relative to the image, after the resize) and encode one image;
    ImageError says why it cannot be used."""
    fmt = sniff(data)
    if fmt is None or fmt not in ALLOWED_FORMATS:
        raise ImageError(f"not an allowed image format (leading bytes {data[:8]!r})")
    if settings.disable_all_reencoding:
        return _as_is(data, fmt, settings)
    changed = False  # whether the pixels differ from the decoded bytes' (skip_reencode keeps the bytes if not)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size  # from the header: nothing decoded yet
            _header_checks(w, h, settings)
            keep_size = _keeps_size(w, h, settings)
            tw, th = _target_size(w, h, settings)
            if fmt == "JPEG" and settings.resize_mode != "no" and not keep_size:
                img.draft("RGB", (tw, th))  # decode at a reduced scale: the big win for large JPEGs
            rotated = img.getexif().get(0x0112, 1) != 1  # EXIF orientation: rare, and transposing copies
            mode = img.mode
            img = _to_rgb(img)
            changed = rotated or mode not in ("RGB", "L")
            if rotated:
                ImageOps.exif_transpose(img, in_place=True)
            if img.size != (w, h) and settings.resize_mode != "no" and not keep_size:
                tw, th = _target_size(img.width, img.height, settings)
            elif img.size != (w, h):
                tw, th = img.size
            if (tw, th) != img.size:
                # As img2dataset: area averaging to shrink (after the JPEG draft did the coarse part), Lanczos
                # to enlarge. Area is also the fastest filter that does not alias.
                shrink = tw * th < img.width * img.height
                img = img.resize((tw, th), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
                changed = True
            if boxes:
                img = blur_boxes(img, boxes)  # after the resize, before the crop or border (as img2dataset)
                changed = True
            s = settings.image_size
            if settings.resize_mode == "center_crop" and not keep_size:
                left, top = (img.width - s) // 2, (img.height - s) // 2
                img = img.crop((left, top, left + s, top + s))
                changed = changed or img.size != (tw, th)
            elif settings.resize_mode == "border" and not keep_size:
                before = img.size
                img = pad_square(img, s)
                changed = changed or img.size != before
    except ImageError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own header check fired first
        raise ImageError(f"image is over the budget of {settings.max_pixels} pixels: {err}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"cannot decode {fmt}: {err}") from err
    kind = ENCODE_FORMATS[settings.encode_format]
    if settings.skip_reencode and not changed and fmt == kind:
        encoded = data
    else:
        buf = io.BytesIO()
        if kind == "PNG":
            img.save(buf, format=kind)
        else:
            img.save(buf, format=kind, quality=settings.encode_quality)
        encoded = buf.getvalue()
    return Processed(
        data=encoded,
        width=img.width,
        height=img.height,
        original_width=w,
        original_height=h,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=perceptual_hash(img),
        original=data if settings.keep_original else None,
    )


def exif_json(data: bytes) -> str | None:
    """The image's EXIF tags as a JSON object of tag name -> text (img2dataset's `exif` column; Pillow's tag
    names, where img2dataset's exifread prefixes them with their IFD, e.g. "Image Make"), or None."""
    import orjson
    from PIL import ExifTags

    try:
        exif = Image.open(io.BytesIO(data)).getexif()
    except Exception:  # noqa: BLE001 - an unreadable EXIF block is no EXIF, as in img2dataset
        return None
    tags = {}
    for tag, value in exif.items():
        name = ExifTags.TAGS.get(tag, str(tag))
        if value is not None:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            tags[name] = text.strip().replace("\x00", "")
    return orjson.dumps(tags).decode() if tags else None
