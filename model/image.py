"""Image loading and the official eval preprocessing (docs/model.md §4.2), with PIL and numpy only.

Loading honours the EXIF orientation by default (``exif_transpose=False`` reproduces the official loader,
which ignores it) and, for user input, decodes only an allow-list of formats (:data:`DEFAULT_FORMATS`).
Then PIL ``convert('RGB')`` -> square bicubic resize to ``image_res`` (PIL's resampler, antialiased, aspect ratio
not kept) -> /255 -> CLIP mean/std. Equals torchvision's ``Resize((R, R), BICUBIC)``, ``ToTensor``,
``Normalize`` bit for bit (tested).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from albef.model.config import CLIP_MEAN, CLIP_STD

ImageSource = str | Path | bytes | Image.Image

# The decoders user images may reach (uploads and index builds; configurable there). Pillow has about 40
# more (EPS, PSD, FITS, ...): parsers of rarely used formats that no search user needs and that an
# attacker would love to reach.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageFormatError(ValueError):
    """The bytes are an image in a format outside the allow-list (``format``), or in none Pillow knows."""

    def __init__(self, fmt: str | None, allowed: Sequence[str]) -> None:
        self.format = fmt
        self.allowed = tuple(allowed)
        what = f"{fmt} images are not accepted" if fmt else "not an image in a known format"
        super().__init__(f"{what} (accepted: {', '.join(self.allowed)})")


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"jpeg, png"`` or a list -> ``("JPEG", "PNG")``; a name Pillow does not know is a ValueError."""
    names = [n.strip().upper() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    Image.init()
    unknown = [n for n in names if n not in Image.OPEN]
    if unknown or not names:
        raise ValueError(
            f"unknown image formats {unknown or '(none given)'}; Pillow knows {', '.join(Image.OPEN)}"
        )
    return tuple(names)


def sniff_format(head: bytes) -> str | None:
    """Which Pillow format the first bytes announce, by Pillow's own signature checks (no decoder runs)."""
    Image.init()
    prefix = bytes(head[:16])
    for fmt, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a signature check that cannot read this prefix did not match
            continue
    return None


def open_image(data: bytes, formats: Sequence[str] | None = DEFAULT_FORMATS) -> Image.Image:
    """Bytes -> a lazily decoded PIL image, trying only the decoders in ``formats`` (None: all of them).
    Raises :class:`ImageFormatError` naming the format when it is not allowed."""
    allowed = None if formats is None else [f.upper() for f in formats]
    try:
        return Image.open(io.BytesIO(data), formats=allowed)
    except UnidentifiedImageError:
        if allowed is None:
            raise
        fmt = sniff_format(data)
        if fmt is None or fmt in allowed:
            raise  # not an image at all, or a damaged one of an accepted format
        raise ImageFormatError(fmt, allowed) from None


def upright(img: Image.Image, exif_transpose: bool = True) -> Image.Image:
    """Apply the EXIF orientation tag (how phones store portrait photos), so the pixels are as the photo is
    seen. ``exif_transpose=False`` keeps the stored pixel order, as the official ALBEF loader does."""
    if not exif_transpose:
        return img
    return ImageOps.exif_transpose(img) or img


def load_image(
    source: ImageSource, *, exif_transpose: bool = True, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open a path, raw bytes or a PIL image and return it decoded as RGB, upright by its EXIF orientation
    unless ``exif_transpose=False`` (the official loader). ``formats`` restricts the decoders for paths and
    bytes (default: all; user-facing callers pass an allow-list)."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, bytes | bytearray):
        img = open_image(bytes(source), formats)
    else:
        img = open_image(Path(source).read_bytes(), formats)
    img = upright(img, exif_transpose)
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


def normalize(
    img: Image.Image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
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
    *,
    exif_transpose: bool = True,
) -> np.ndarray:
    """Images -> float32 pixels ``[B, 3, image_res, image_res]`` (``exif_transpose``: see :func:`upright`)."""
    out = np.empty((len(images), 3, image_res, image_res), dtype=np.float32)
    for i, src in enumerate(images):
        out[i] = normalize(resize(load_image(src, exif_transpose=exif_transpose), image_res), mean, std)
    return out
