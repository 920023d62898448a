"""Safe decoding of uploaded images and content types of stored ones.

Uploads are untrusted: only an allow-list of formats reaches a decoder (415 names the refused format), the
EXIF orientation is applied (unless the official loader is asked for), the size in bytes is capped before decoding, the pixel count is checked from the
header before any pixel is decoded (so a small PNG that inflates to gigabytes is refused cheaply), and
Pillow's own decompression-bomb guard stays on (``Image.MAX_IMAGE_PIXELS`` is set from the settings and
``DecompressionBombWarning`` is turned into an error by :func:`configure_pillow`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from albef.model.image import DEFAULT_FORMATS, ImageFormatError, open_image, to_rgb, upright
from albef.service.domain_errors import BadQuery, SearchError, TooLarge, UnsupportedFormat

__all__ = ["UploadPolicy", "configure_pillow", "decode_upload", "sniff_content_type"]


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
