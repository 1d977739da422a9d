"""Image checks and resize modes on images made here."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from laion_assets.core.download.resize import ImageError, process_image, sniff
from laion_assets.core.offline.synthetic import Scene, jpeg_bytes, render
from laion_assets.core.settings import ResizeSettings
from laion_assets_tests.handlers import png_header_only


def photo(w: int, h: int) -> bytes:
    return jpeg_bytes(render(Scene("circle", "red", "blue", "left"), (w, h), seed=1))


@pytest.mark.parametrize(
    ("mode", "size"),
    [("border", (256, 256)), ("keep_ratio", (341, 256)), ("keep_ratio_largest", (256, 192)),
     ("center_crop", (256, 256)), ("no", (800, 600))],
)
def test_resize_modes(mode, size):
    out = process_image(photo(800, 600), ResizeSettings(resize_mode=mode))
    img = Image.open(io.BytesIO(out.data))
    assert img.size == size == (out.width, out.height)
    assert (out.original_width, out.original_height) == (800, 600)
    assert len(out.sha256) == 64 and len(out.phash) == 16


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_encode_formats(fmt):
    out = process_image(photo(400, 300), ResizeSettings(encode_format=fmt))
    assert sniff(out.data) == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]


def test_bad_bytes_are_image_errors():
    with pytest.raises(ImageError, match="not an allowed image format"):
        process_image(b"<html><body>not an image</body></html>", ResizeSettings())
    with pytest.raises(ImageError, match="cannot decode"):
        process_image(photo(400, 300)[:600], ResizeSettings())  # truncated JPEG
    with pytest.raises(ImageError, match="over the budget"):
        process_image(png_header_only(100_000, 100_000), ResizeSettings())
    with pytest.raises(ImageError, match="min_image_size"):
        process_image(photo(100, 80), ResizeSettings(min_image_size=200))
    with pytest.raises(ImageError, match="aspect ratio"):
        process_image(photo(900, 100), ResizeSettings(max_aspect_ratio=3))


def test_same_bytes_same_hashes_and_similar_images_close_phash():
    a = process_image(photo(640, 480), ResizeSettings())
    b = process_image(photo(640, 480), ResizeSettings())
    assert a.sha256 == b.sha256 and a.phash == b.phash
    c = process_image(jpeg_bytes(render(Scene("circle", "red", "blue", "left"), (640, 480), seed=1), 40),
                      ResizeSettings())
    assert c.sha256 != a.sha256
    other = process_image(jpeg_bytes(render(Scene("circle", "red", "blue", "right"), (640, 480), seed=1)),
                          ResizeSettings())

    def bits(x: str, y: str) -> int:
        return bin(int(x, 16) ^ int(y, 16)).count("1")

    # A recompressed copy stays close; the same picture mirrored is far.
    assert bits(a.phash, c.phash) <= 12 < 20 < bits(a.phash, other.phash)


def test_perceptual_hash_is_imagehash_phash_of_the_reduced_image():
    import imagehash

    from laion_assets.core.download.resize import perceptual_hash

    for seed, size in enumerate([(256, 256), (256, 192), (64, 48), (700, 500)]):
        img = render(Scene("circle", "red", "blue", "left"), size, seed=seed)
        grey = img.convert("L")
        factor = max(1, min(size) // 32)
        expected = imagehash.phash(grey.reduce(factor) if factor > 1 else grey)
        assert perceptual_hash(img) == str(expected)


def test_transparency_is_matted_onto_white():
    from PIL import Image as PILImage

    clear = PILImage.new("RGBA", (300, 300), (255, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    out = process_image(buf.getvalue(), ResizeSettings())
    assert PILImage.open(io.BytesIO(out.data)).getpixel((128, 128)) >= (250, 250, 250)
