"""``GET /v1/items/{id}`` (an indexed item) and ``GET /v1/items/{id}/image`` (its stored image file).

The image route serves only files that the index itself records for an image item: the client sends an
integer id, never a path, so nothing from the request is ever joined into a file system path. The content
type comes from the file's bytes (Pillow), and ``nosniff`` stops browsers from guessing otherwise.
"""

from __future__ import annotations

import asyncio
from typing import Any

from albef.service.deps import ReaderDep
from albef.service.engine import public_item
from albef.service.errors import ApiError
from albef.service.images import sniff_content_type
from albef.service.schemas import ErrorResponse, Item
from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(prefix="/v1/items", tags=["items"])


@router.get("/{item_id}", response_model=Item, responses={404: {"model": ErrorResponse}})
async def get_item(item_id: int, reader: ReaderDep) -> Any:
    item = await asyncio.to_thread(reader.item, item_id) if item_id >= 0 else None
    if item is None:
        raise ApiError(404, "item_not_found", f"no item {item_id} in index version {reader.version}")
    return public_item(item)


@router.get("/{item_id}/image", response_class=FileResponse,
            responses={200: {"content": {"image/*": {}}}, 404: {"model": ErrorResponse}})
async def get_item_image(item_id: int, reader: ReaderDep) -> FileResponse:
    def locate() -> tuple[Any, str | None]:
        item = reader.item(item_id) if item_id >= 0 else None
        if item is None:
            raise ApiError(404, "item_not_found", f"no item {item_id} in index version {reader.version}")
        if item["kind"] != "image":
            raise ApiError(404, "not_an_image", f"item {item_id} is a text; it has no image")
        path = reader.image_path(item_id)
        if path is None:
            raise ApiError(404, "image_not_stored", f"item {item_id} is not held as a local file")
        if not path.is_file():
            raise ApiError(404, "image_missing", f"the image file of item {item_id} is no longer available")
        return path, sniff_content_type(path)

    path, content_type = await asyncio.to_thread(locate)
    if content_type is None:
        raise ApiError(404, "image_unreadable", f"the stored file of item {item_id} is not a readable image")
    return FileResponse(path, media_type=content_type, headers={"X-Content-Type-Options": "nosniff",
                                                                 "Cache-Control": "private, max-age=3600"})
