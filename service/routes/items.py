"""``GET /v1/items/{id}`` (an indexed item) and ``GET /v1/items/{id}/image`` (its stored image file).

The image route serves only files that the index itself records for an image item: the client sends an
integer id, never a path, so nothing from the request is ever joined into a file system path. The file is
read without following a final symlink and served only if its sha256 is the one indexed (a file swapped or
re-linked after indexing, e.g. to something outside the image folder, is refused); the bytes that were
checked are the bytes sent. The content type comes from those bytes (Pillow), and ``nosniff`` stops
browsers from guessing otherwise.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from albef.service.deps import ReaderDep
from albef.service.errors import ApiError
from albef.service.images import read_stored_image, sniff_content_type
from albef.service.schemas import ErrorResponse, Item

_MAX_ID = 2**63 - 1  # ids are int64; larger numbers are simply not items (and would overflow SQLite)

router = APIRouter(prefix="/v1/items", tags=["items"])


def public_item(item: dict[str, Any]) -> dict[str, Any]:
    """An index record as the API shows it: no local paths; images held as files get an ``image_url`` (the
    route below)."""
    path = item.get("path")
    out = {
        "id": int(item["id"]),
        "kind": item["kind"],
        "caption": item.get("caption"),
        "width": item.get("width"),
        "height": item.get("height"),
        "sha256": item.get("sha256"),
        "image_id": item.get("image_id"),
        "metadata": item.get("metadata"),
        "image_url": None,
        "uri": None,
    }
    if item["kind"] == "image" and path:
        if "://" in str(path):
            out["uri"] = str(path)
        else:
            out["image_url"] = f"{router.prefix}/{int(item['id'])}/image"
    return out


@router.get("/{item_id}", response_model=Item, responses={404: {"model": ErrorResponse}})
async def get_item(item_id: int, reader: ReaderDep) -> Any:
    item = await asyncio.to_thread(reader.item, item_id) if 0 <= item_id <= _MAX_ID else None
    if item is None:
        raise ApiError(404, "item_not_found", f"no item {item_id} in index version {reader.version}")
    return public_item(item)


@router.get(
    "/{item_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}},
)
async def get_item_image(item_id: int, reader: ReaderDep) -> Response:
    def locate() -> tuple[bytes, str | None]:
        item = reader.item(item_id) if 0 <= item_id <= _MAX_ID else None
        if item is None:
            raise ApiError(404, "item_not_found", f"no item {item_id} in index version {reader.version}")
        if item["kind"] != "image":
            raise ApiError(404, "not_an_image", f"item {item_id} is a text; it has no image")
        path = reader.image_path(item_id)
        if path is None:
            raise ApiError(404, "image_not_stored", f"item {item_id} is not held as a local file")
        try:
            data = read_stored_image(path, item.get("sha256"))
        except OSError:  # gone, not a regular file, or a symlink (ELOOP)
            raise ApiError(
                404, "image_missing", f"the image file of item {item_id} is no longer available"
            ) from None
        if data is None:
            raise ApiError(
                404, "image_changed", f"the file of item {item_id} no longer holds the indexed image"
            )
        return data, sniff_content_type(io.BytesIO(data))

    data, content_type = await asyncio.to_thread(locate)
    if content_type is None:
        raise ApiError(404, "image_unreadable", f"the stored file of item {item_id} is not a readable image")
    return Response(
        data,
        media_type=content_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
    )
