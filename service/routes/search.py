"""``POST /v1/search/images`` (text -> images) and ``POST /v1/search/texts`` (image -> texts).

``/v1/search/texts`` takes either JSON (``{"image_base64", ...}`` or ``{"item_id", ...}``) or a multipart
form with the file in field ``image`` and the other fields as form fields (``filter`` as a JSON string). Both
routes answer with the same :class:`SearchResponse`. A ``filter`` is parsed here
(:func:`albef.index.filters.parse_filter`): a malformed one is a 422 ``invalid_filter`` whose ``field`` is the
JSON path of the bad part. Limits from the settings (``max_k``, ``max_rerank_k``, ``max_text_chars``, upload
bytes, image pixels) are checked here and answered with 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import FormData

from albef.index.filters import Filter, FilterError, parse_filter
from albef.service.deps import EngineDep, ReaderDep, SettingsDep
from albef.service.domain_errors import WrongItemKind
from albef.service.engine import SearchEngine, SearchRequest, SearchResult
from albef.service.errors import ApiError
from albef.service.protocols import IndexView
from albef.service.routes.items import public_item
from albef.service.schemas import ErrorResponse, Hit, ImageSearchRequest, SearchResponse, TextSearchRequest
from albef.service.uploads import UploadForm, is_json, media_type
from albef.settings import Settings

router = APIRouter(prefix="/v1/search", tags=["search"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 413, 415, 422, 503)
}
_FORM_FIELDS = (
    "k",
    "rerank",
    "rerank_k",
    "item_id",
    "exclude",
    "filter",
    "min_itc_score",
    "min_match_probability",
)
_FORM_SCALARS = ("k", "rerank", "rerank_k", "item_id", "min_itc_score", "min_match_probability")


def _limits(body: ImageSearchRequest | TextSearchRequest, settings: Settings) -> tuple[int, int]:
    k = body.k if body.k is not None else settings.default_k
    rerank_k = body.rerank_k if body.rerank_k is not None else settings.default_rerank_k
    if k > settings.max_k:
        raise ApiError(422, "validation_error", f"k: at most {settings.max_k}", field="k")
    if rerank_k > settings.max_rerank_k:
        raise ApiError(
            422, "validation_error", f"rerank_k: at most {settings.max_rerank_k}", field="rerank_k"
        )
    return k, rerank_k


def _filter(body: ImageSearchRequest | TextSearchRequest) -> Filter | None:
    if body.filter is None:
        return None
    try:
        return parse_filter(body.filter)
    except FilterError as exc:
        raise ApiError(422, "invalid_filter", str(exc), field=exc.path) from exc


def _request(
    direction: Any, body: ImageSearchRequest | TextSearchRequest, settings: Settings, **query: Any
) -> SearchRequest:
    k, rerank_k = _limits(body, settings)
    return SearchRequest(
        direction,
        item_id=body.item_id,
        k=k,
        rerank=body.rerank,
        rerank_k=rerank_k,
        exclude=body.exclude,
        filter=_filter(body),
        min_itc_score=body.min_itc_score,
        min_match_probability=body.min_match_probability,
        **query,
    )


async def _search(
    engine: SearchEngine, reader: IndexView, request: SearchRequest, path: str
) -> SearchResponse:
    try:
        result = await engine.search(reader, request)
    except WrongItemKind as exc:
        # The engine knows directions, not URLs: name the route that was called.
        raise ApiError(
            422,
            exc.code,
            f"item {exc.item_id} is an {exc.kind}; {path} needs an indexed {exc.wanted}",
            field=exc.field,
        ) from exc
    return await _respond(result, reader, engine, request)


async def _respond(
    result: SearchResult, reader: IndexView, engine: SearchEngine, request: SearchRequest
) -> SearchResponse:
    items = {it["id"]: it for it in await asyncio.to_thread(reader.items, result.ids)}
    hits = [
        Hit(
            id=i,
            rank=r + 1,
            itc_rank=c,
            itc_score=s,
            itm_score=m,
            match_probability=p,
            metadata=public_item(items[i]),
        )
        for r, (i, c, s, m, p) in enumerate(
            zip(result.ids, result.itc_rank, result.itc, result.itm, result.prob, strict=True)
        )
        if i in items
    ]
    return SearchResponse(
        results=hits,
        timings_ms=result.timings_ms,
        k=request.k,
        rerank=request.rerank,
        rerank_k=request.rerank_k,
        candidates=result.candidates,
        cut=result.cut,
        filter=result.filter,
        query=result.query,
        index_version=reader.version,
        bundle_id=engine.bundle.bundle_id,
    )


async def _require_json(request: Request) -> None:
    """415 for a body that is not JSON (FastAPI would otherwise report it as a confusing validation error).
    Async, as every dependency here: FastAPI runs a sync one in its thread pool, a hop per request that under
    a flood of requests had 40 threads contending for the GIL with the ones doing the searches."""
    if not is_json(media_type(request)):
        raise ApiError(415, "unsupported_media_type", "send the search as application/json")


@router.post(
    "/images",
    response_model=SearchResponse,
    responses=_ERRORS,
    summary="text -> images",
    dependencies=[Depends(_require_json)],
)
async def search_images(
    body: ImageSearchRequest, settings: SettingsDep, reader: ReaderDep, engine: EngineDep
) -> SearchResponse:
    if body.text is not None and len(body.text) > settings.max_text_chars:
        raise ApiError(
            422, "text_too_long", f"text: at most {settings.max_text_chars} characters", field="text"
        )
    # A text without words is refused by the engine, where the text is cleaned for the model.
    request = _request("t2i", body, settings, text=body.text)
    return await _search(engine, reader, request, f"{router.prefix}/images")


def _texts_form(form: FormData) -> dict[str, Any]:
    """The multipart fields of ``/v1/search/texts`` as the request's input: the scalars as given, the filter
    parsed from its JSON string, ``exclude`` comma-separated (or repeated)."""
    fields: dict[str, Any] = {key: form.get(key) for key in _FORM_SCALARS if form.get(key) not in (None, "")}
    raw_filter = form.get("filter")
    if isinstance(raw_filter, str) and raw_filter.strip():
        try:
            fields["filter"] = json.loads(raw_filter)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ApiError(
                422,
                "invalid_filter",
                "filter: not valid JSON (send the filter as a JSON object)",
                field="filter",
            ) from exc
    excl = [x for v in form.getlist("exclude") if isinstance(v, str) for x in v.split(",") if x.strip()]
    if excl:
        fields["exclude"] = excl
    return fields


_TEXTS_UPLOAD = UploadForm(TextSearchRequest, _FORM_FIELDS, _texts_form)


_TEXTS_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": TextSearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1},
                        "rerank": {"type": "boolean"},
                        "rerank_k": {"type": "integer", "minimum": 1},
                        "item_id": {"type": "integer", "minimum": 0},
                        "exclude": {"type": "array", "items": {"type": "integer"}},
                        "filter": {
                            "type": "string",
                            "description": "the filter as a JSON object in a string (service/API.md, Filters)",
                        },
                        "min_itc_score": {"type": "number", "minimum": -1, "maximum": 1},
                        "min_match_probability": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
        },
    }
}


@router.post(
    "/texts",
    response_model=SearchResponse,
    responses=_ERRORS,
    summary="image -> texts",
    openapi_extra=_TEXTS_OPENAPI,
)
async def search_texts(
    request: Request, settings: SettingsDep, reader: ReaderDep, engine: EngineDep
) -> SearchResponse:
    body, data = await _TEXTS_UPLOAD.parse(request, settings.max_upload_bytes)
    search = _request("i2t", body, settings, image=data)
    return await _search(engine, reader, search, f"{router.prefix}/texts")
