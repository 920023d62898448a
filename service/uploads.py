"""The body of a route that takes an image upload (``POST /v1/search/texts``, ``POST /v1/explain``): HTTP only.

Such a route takes either JSON, with the image base64-encoded in ``image_base64`` (a browser's ``data:`` URL
prefix is dropped), or a multipart form with the file in field ``image`` and the other fields as form fields.
:meth:`UploadForm.parse` reads either into the route's pydantic model and the image's bytes; what is the same
for every such route lives here once (the content types, the form's limits, unknown fields, the file read with
a byte limit, the base64 size check and decoding, the JSON object), and each route's :class:`UploadForm` says
only which form fields it has and how their strings become the model's input. Decoding the image itself is
:func:`albef.service.images.decode_upload`'s work, later.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from albef.service.errors import ApiError

__all__ = ["UploadForm", "decode_base64_image", "is_json", "media_type", "validate"]

M = TypeVar("M", bound=BaseModel)

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_MAX_FORM_PART = 64 * 1024  # a form field other than the file


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when there is none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(ctype: str) -> bool:
    """Whether a body of media type ``ctype`` is read as JSON (no content type at all is)."""
    return ctype in ("application/json", "") or ctype.endswith("+json")


def validate(model: type[M], data: Any) -> M:
    """``data`` as ``model``; its errors answered as FastAPI's own validation errors (a 422 naming the field)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from exc


def decode_base64_image(b64: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``image_base64`` (a ``data:`` URL too): 413 when it would exceed ``max_bytes``,
    422 ``invalid_image`` when it is not base64."""
    if len(b64) > max_bytes * 4 // 3 + 4:
        raise ApiError(
            413,
            "payload_too_large",
            f"image_base64: the image exceeds {max_bytes} bytes",
            field="image_base64",
        )
    if b64.startswith("data:") and "," in b64[:100]:
        b64 = b64.split(",", 1)[1]  # a data: URL as browsers produce it
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_image", "image_base64: not valid base64", field="image_base64") from exc


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        payload = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "validation_error", "body: invalid JSON", field="body") from exc
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "body: expected a JSON object", field="body")
    return payload


@dataclass(frozen=True)
class UploadForm(Generic[M]):
    """How one route's body is read: its ``model`` (which has an ``image_base64`` field), the ``fields`` a form
    may hold besides the file ``image``, and ``values``, which turns the form into the model's input (raising
    its own 422s for a field it cannot read)."""

    model: type[M]
    fields: Sequence[str]
    values: Callable[[FormData], dict[str, Any]]

    async def parse(self, request: Request, max_bytes: int) -> tuple[M, bytes | None]:
        """The request as the model and the image's bytes (None without one).

        A multipart (or url-encoded) form: any field but ``fields`` and ``image`` is a 422; the file is read
        up to ``max_bytes`` + 1 bytes (the decoder refuses a larger one); the upload stands in for
        ``image_base64`` when the model checks that exactly one image or query is given. A JSON body: an
        object validated as the model, its ``image_base64`` decoded. Any other content type: 415.
        """
        ctype = media_type(request)
        if ctype in _FORM_TYPES:
            form = await request.form(
                max_files=1, max_fields=len(self.fields) + 8, max_part_size=_MAX_FORM_PART
            )
            try:
                unknown = sorted({key for key in form if key not in (*self.fields, "image")})
                if unknown:
                    raise ApiError(
                        422, "validation_error", f"{unknown[0]}: unknown form field", field=unknown[0]
                    )
                upload = form.get("image")
                data: bytes | None = None
                if upload is not None:
                    if isinstance(upload, str):
                        raise ApiError(422, "validation_error", "image: must be a file upload", field="image")
                    data = await upload.read(max_bytes + 1)
                values = self.values(form)
                body = validate(self.model, {**values, **({"image_base64": "-"} if data is not None else {})})
                return body, data
            finally:
                await form.close()
        if is_json(ctype):
            body = validate(self.model, await _json_object(request))
            b64 = getattr(body, "image_base64", None)
            return body, decode_base64_image(b64, max_bytes) if b64 is not None else None
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
