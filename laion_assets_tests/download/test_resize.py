"""Image checks and resize modes on images made here."""

from __future__ import annotations

import io
import itertools
import random
import statistics

import imagehash
import pytest
from PIL import Image

from laion_assets.core.download.resize import ImageError, process_image, sniff
from laion_assets.core.settings import ResizeSettings
from laion_assets.offline.synthetic import POSITIONS, SHAPES, Scene, jpeg_bytes, random_scene, render
from laion_assets_tests.handlers import png_header_only


def photo(w: int, h: int) -> bytes:
    return jpeg_bytes(render(Scene("circle", "red", "blue", "left"), (w, h), seed=1))


def pictures(n: int = 20, seed: int = 0) -> list[Image.Image]:
    """n rendered scenes of different sizes and shapes, from tiny to larger than the stored 256 px."""
    rng = random.Random(seed)
    return [render(random_scene(rng), (rng.randint(64, 1024), rng.randint(64, 1024)), seed=i) for i in range(n)]


def bits(x: str, y: str) -> int:
    return int(imagehash.hex_to_hash(x) - imagehash.hex_to_hash(y))


def stored(data: bytes, settings: ResizeSettings) -> tuple[str, Image.Image]:
    """The stored hash and the stored image, decoded as a reader of the shards would."""
    out = process_image(data, settings)
    img = Image.open(io.BytesIO(out.data))
    img.load()
    return out.phash, img


# The bound of a near-duplicate: copies of one picture should stay within it.
FEW_BITS = 4
MAX_BITS = 8


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

    # A recompressed copy stays close; the same picture mirrored is far.
    assert bits(a.phash, c.phash) <= 12 < 20 < bits(a.phash, other.phash)


@pytest.mark.parametrize(
    "settings",
    [ResizeSettings(encode_format="png"), ResizeSettings(resize_mode="no", encode_format="png")],
    ids=["border-256", "no-resize"],
)
def test_stored_phash_is_close_to_imagehash_phash_of_the_stored_image(settings):
    # PNG so that the decoded file is exactly the image that was hashed: only the two recipes differ (ours reduces
    # the image before the Lanczos resize). The module docstring states these figures; this keeps them true.
    distances = []
    for img in pictures():
        phash, image = stored(jpeg_bytes(img), settings)
        distances.append(bits(phash, str(imagehash.phash(image))))
    assert statistics.mean(distances) <= FEW_BITS, distances
    assert sum(d <= FEW_BITS for d in distances) >= 0.75 * len(distances), distances
    assert max(distances) <= 20, distances  # measured: 12 bits (border), 16 (no resize) on near-symmetric scenes


def test_phash_of_a_small_image_is_imagehash_phash():
    # Below 64 px nothing is reduced: the recipes coincide.
    from laion_assets.core.download.phash import perceptual_hash

    for img in pictures():
        small = img.resize((48, 40))
        assert perceptual_hash(small) == str(imagehash.phash(small))


def test_a_recompressed_copy_stays_close():
    to_copy = []
    for img in pictures(seed=1):
        original = stored(jpeg_bytes(img), ResizeSettings())[0]
        to_copy.append(bits(original, stored(jpeg_bytes(img, 40), ResizeSettings())[0]))
    # On the mean only: where a scene is near-symmetric, half of pHash's DCT coefficients sit near the median it
    # thresholds at, and re-encoding flips them together (imagehash's own hash too, by up to 18 bits).
    assert statistics.mean(to_copy) <= FEW_BITS, to_copy


def test_pictures_with_another_layout_are_far():
    # Only the layout: pHash sees grey levels, so two colourings of one layout may rightly hash alike.
    scenes = [Scene(shape, "black", "white", position) for shape in SHAPES for position in POSITIONS]
    originals, copies = {}, {}
    for seed, scene in enumerate(scenes):
        img = render(scene, (640, 480), seed=seed)
        originals[scene] = stored(jpeg_bytes(img), ResizeSettings())[0]
        copies[scene] = stored(jpeg_bytes(img, 40), ResizeSettings())[0]
    for a, b in itertools.combinations(scenes, 2):
        if a.position != b.position:
            assert bits(originals[a], originals[b]) > MAX_BITS, (a, b)  # not a near-duplicate
    # What near-duplicate search needs: a copy's nearest stored picture is its own.
    for scene in scenes:
        own = bits(copies[scene], originals[scene])
        assert all(own < bits(copies[scene], originals[other]) for other in scenes if other.position != scene.position)


def test_transparency_is_matted_onto_white():
    from PIL import Image as PILImage

    clear = PILImage.new("RGBA", (300, 300), (255, 0, 0, 0))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    out = process_image(buf.getvalue(), ResizeSettings())
    assert PILImage.open(io.BytesIO(out.data)).getpixel((128, 128)) >= (250, 250, 250)
