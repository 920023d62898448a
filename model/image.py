"""Image loading and the official eval preprocessing (spec 4.2), with PIL and numpy only.

PIL ``convert('RGB')`` -> square bicubic resize to ``image_res`` (PIL's resampler, antialiased, aspect ratio
not kept) -> /255 -> CLIP mean/std. Equals torchvision's ``Resize((R, R), BICUBIC)``, ``ToTensor``,
``Normalize`` bit for bit (tested).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from albef.model.config import CLIP_MEAN, CLIP_STD
from PIL import Image

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or a PIL image and return it decoded as RGB."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, bytes | bytearray):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(Path(source))
    if img.mode == "RGB":
        img.load()
        return img
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion that also handles 16-bit greyscale (``I;16``/``I``), which PIL would clip to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize(img: Image.Image, image_res: int) -> Image.Image:
    return img.resize((image_res, image_res), Image.Resampling.BICUBIC)


def normalize(img: Image.Image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """An RGB image of the final size -> float32 ``[3, H, W]``."""
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    arr = arr.transpose(2, 0, 1)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - m) / s)


def preprocess(
    images: Sequence[ImageSource],
    image_res: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """Images -> float32 pixels ``[B, 3, image_res, image_res]``."""
    out = np.empty((len(images), 3, image_res, image_res), dtype=np.float32)
    for i, src in enumerate(images):
        out[i] = normalize(resize(load_image(src), image_res), mean, std)
    return out
