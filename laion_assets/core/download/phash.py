"""The perceptual hash of a stored image: `imagehash.phash`, bit for bit, at a third of its cost.

imagehash's pHash is: greyscale, Pillow's Lanczos resize to 32x32, a 2-D DCT-II, the top-left 8x8 coefficients
compared with their median. Most of its time is Pillow's resize. Lanczos resampling is linear and separable, so
it is done here as two matrix products with Pillow's own fixed-point coefficients (22 bits, each pass rounded
and clipped to 8 bits, passes in the order Pillow picks): integer sums far below 2**53 are exact in float64,
so the result is Pillow's to the last bit. A self-check against Pillow on import falls back to Pillow's resize
if a Pillow release ever computes it differently. The DCT is two small matrix products (no scipy in workers).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images
_HALF, _UNIT = float(1 << (_BITS - 1)), float(1 << _BITS)
SIDE = 32


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


@functools.lru_cache(maxsize=128)
def _weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Lanczos coefficients (precompute_coeffs + normalize_coeffs_8bpc) as an (out, in) matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    matrix = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_lanczos((x - center + 0.5) / filterscale) for x in range(xmin, xmax)]
        total = 0.0
        for v in w:  # summed in order, as the C loop does
            total += v
        for i, v in enumerate(w):
            v = v / total if total != 0.0 else v
            matrix[xx, xmin + i] = int(v * _UNIT - 0.5) if v < 0 else int(v * _UNIT + 0.5)
    return matrix


def _round8(sums: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((sums + _HALF) / _UNIT), 0, 255)


def _lanczos_side(grey: np.ndarray) -> np.ndarray:
    """A greyscale image (H, W) resized to SIDE x SIDE as Pillow 13's `resize(LANCZOS)` does it."""
    h, w = grey.shape
    horizontal = lambda a: a if w == SIDE else _round8(a @ _weights(w, SIDE).T)  # noqa: E731
    vertical = lambda a: a if h == SIDE else _round8(_weights(h, SIDE) @ a)  # noqa: E731
    # Pillow runs the vertical pass first when the height shrinks more than twice as much as the width.
    if h - SIDE > 0 and h - SIDE > (w - SIDE) * 2:
        return horizontal(vertical(grey))
    return vertical(horizontal(grey))


def _replica_matches_pillow() -> bool:
    rng = np.random.default_rng(0)
    for size in ((256, 256), (341, 256), (256, 341), (40, 33), (700, 90), (90, 700), (20, 24), (32, 32)):
        pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
        img = Image.fromarray(pixels, "L")
        expected = np.asarray(img.resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
        if not np.array_equal(expected, _lanczos_side(pixels.astype(np.float64))):
            return False
    return True


_USE_REPLICA = _replica_matches_pillow()


def _dct_matrix(n: int) -> np.ndarray:
    """scipy.fftpack's unnormalised DCT-II as a matrix: dct(x, axis=0) == M @ x."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(SIDE)


def perceptual_hash(img: Image.Image) -> str:
    """`imagehash.phash(img)` as a hex string (`imagehash.hex_to_hash` reads it)."""
    grey = img.convert("L")
    if _USE_REPLICA:
        pixels = _lanczos_side(np.asarray(grey, dtype=np.float64))
    else:
        pixels = np.asarray(grey.resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    return np.packbits(low > np.median(low)).tobytes().hex()
