"""The device path of the CLIP pass: the batch's JPEG bytes decoded on the model's device (nvJPEG in one batched
call on CUDA, libjpeg-turbo through torchvision on the CPU), then resized there to every model's view, as uint8.

What nvJPEG refuses (a CMYK or progressive oddity, a PNG among the JPEGs) is decoded on the CPU one image at a
time, by torchvision and then by PIL; an image nothing decodes is the sample's error (one failed_to_decode row),
its pixels zeros. Images of the same size (the download stage's 256 px squares, usually all of them) are resized
as one tensor.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from laion_assets.core.clip.loader import Batch, View


def _cpu_decode(data: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) by torchvision, else PIL (formats torchvision lacks); raises what the last one raised."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image

        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def decode(datas: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], list[str]]:
    """Each image's uint8 (3, H, W) on `device` (None where it cannot be decoded) and its error ("" if none)."""
    images: list[torch.Tensor | None] = [None] * len(datas)
    errors = [""] * len(datas)
    todo = list(range(len(datas)))
    if device.type == "cuda" and datas:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
            todo = []
        except RuntimeError:  # one image nvJPEG refuses fails the batch call: decode one by one
            todo = []
            for i, data in enumerate(datas):
                try:
                    images[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    todo.append(i)
    for i in todo:
        try:
            images[i] = _cpu_decode(datas[i]).to(device, non_blocking=True)
        except Exception as err:  # noqa: BLE001 - one bad image is one failed row
            errors[i] = f"cannot decode image: {type(err).__name__}: {err}"
    return images, errors


def resize_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, S, S): the short side to S and a centre crop (CLIP), or a squash to
    S x S (watermark); with the view's interpolation (bicubic, or LAION's watermark model's bilinear) and
    antialiasing, as the PIL path."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(view.interpolation)
    if view.crop:
        return F.center_crop(F.resize(images, [view.size], interpolation=mode, antialias=True), [view.size])
    return F.resize(images, [view.size, view.size], interpolation=mode, antialias=True)


def device_views(batch: Batch, views: list[View], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch decoded on `device`, in every view: view key -> uint8 (N, 3, S, S). Decode errors are written
    into `batch.errors`."""
    n = len(batch.keys)
    datas = [batch.image_bytes(i) for i in range(n)]  # views of one (pinned, on CUDA) buffer
    images, errors = decode(datas, device)
    for i, err in enumerate(errors):
        if err and not batch.errors[i]:
            batch.errors[i] = err
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if img is not None:
            by_shape.setdefault(tuple(img.shape), []).append(i)
    out = {}
    for view in {v.key: v for v in views}.values():
        pixels = torch.zeros((n, 3, view.size, view.size), dtype=torch.uint8, device=device)
        for rows in by_shape.values():
            group = torch.stack([images[i] for i in rows])  # type: ignore[misc]
            pixels[torch.as_tensor(rows, device=device)] = resize_view(group, view)
        out[view.key] = pixels
    return out
