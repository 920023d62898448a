"""Safe decoding of uploaded images; reading back and typing the stored ones.

Uploads are untrusted: only an allow-list of formats reaches a decoder (415 names the refused format), the
EXIF orientation is applied (unless the official loader is asked for), the size in bytes is capped before decoding, the pixel count is checked from the
header before any pixel is decoded (so a small PNG that inflates to gigabytes is refused cheaply), and
Pillow's own decompression-bomb guard stays on (``Image.MAX_IMAGE_PIXELS`` is set from the settings and
``DecompressionBombWarning`` is turned into an error by :func:`configure_pillow`).

A stored image is read back (:func:`read_stored_image`, for ``GET /v1/items/{id}/image`` and the explain
overlay) only as the regular file the index recorded, without following a final symlink and never blocking on
a FIFO or device, and only if it still holds the indexed bytes (sha256).
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from albef.model.image import DEFAULT_FORMATS, ImageFormatError, open_image, to_rgb, upright
from albef.service.domain_errors import BadQuery, SearchError, TooLarge, UnsupportedFormat

__all__ = ["UploadPolicy", "configure_pillow", "decode_upload", "read_stored_image", "sniff_content_type"]


def configure_pillow(max_image_pixels: int) -> None:
    """Set Pillow's decompression-bomb limit and make its warning an error (process-wide; done at start-up)."""
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class UploadPolicy:
    """How uploads are decoded: size limits, the formats whose decoders they may reach, EXIF orientation."""

    max_bytes: int = 10 << 20
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS
    exif_transpose: bool = True  # False: the official loader's pixel order

    @classmethod
    def from_settings(cls, s: Any) -> UploadPolicy:
        return cls(
            max_bytes=s.max_upload_bytes,
            max_pixels=s.max_image_pixels,
            formats=tuple(s.image_formats),
            exif_transpose=not s.official_loader,
        )


def decode_upload(data: bytes, policy: UploadPolicy) -> Image.Image:
    """Bytes of an uploaded image -> upright RGB PIL image, or a :class:`TooLarge`, :class:`UnsupportedFormat`
    or :class:`BadQuery` that says why not."""
    if not data:
        raise BadQuery("invalid_image", "the image is empty", field="image")
    if len(data) > policy.max_bytes:
        raise TooLarge(
            "payload_too_large",
            f"the image has {len(data)} bytes; the limit is {policy.max_bytes}",
            field="image",
        )
    try:
        img = open_image(data, policy.formats)
        width, height = img.size
        if width * height > policy.max_pixels:
            raise TooLarge(
                "image_too_large",
                f"the image has {width}x{height} pixels; the limit is {policy.max_pixels} pixels",
                field="image",
            )
        img.load()
        # to_rgb, as the index builder does: plain convert('RGB') clips 16-bit greyscale to white.
        rgb = to_rgb(upright(img, policy.exif_transpose))
    except SearchError:
        raise
    except ImageFormatError as exc:
        raise UnsupportedFormat("unsupported_image_format", str(exc), field="image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(
            "image_too_large", f"the image exceeds the pixel limit ({policy.max_pixels})", field="image"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated/corrupt files with several exception types; none of their texts is shown.
        raise BadQuery("invalid_image", "the data is not a readable image", field="image") from exc
    return rgb


def sniff_content_type(path: Path | IO[bytes]) -> str | None:
    """The MIME type of a stored image from its bytes (not its name), or None if Pillow cannot identify it."""
    try:
        with Image.open(path) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if fmt is None:
        return None
    return Image.MIME.get(fmt.upper())


def read_stored_image(
    path: str | os.PathLike[str], sha256: str | None, *, max_bytes: int | None = None
) -> bytes | None:
    """The bytes of an indexed image's file if they are still the indexed ones (their sha256 is ``sha256``),
    else None; with ``max_bytes``, None too for a file larger than that (read no further). OSError when there
    is no regular file to read: gone, a folder, a FIFO or device (never blocks), or a final symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"not a regular file: {path}")
        data = fh.read(-1 if max_bytes is None else max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None
