"""``POST /v1/explain``: where in an image a text matched, as a Grad-CAM heat map (JSON grid and PNG overlay).

The body is JSON (``{"text", "item_id" | "image_base64", "per_word", "overlay"}``) or a multipart form with
the file in field ``image`` and the other fields as form fields, as ``/v1/search/texts`` takes them. The
answer is always JSON: the grid, the tokens, per-word grids on request, the pair's ITM score, and the overlay
PNG base64-encoded (``overlay``, on by default). A bundle without the explain graph (exported before bundle
format 2) answers 409. The Grad-CAM itself: :mod:`albef.service.explain`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import FormData

from albef.service.deps import EngineDep, ReaderDep, SettingsDep
from albef.service.errors import ApiError
from albef.service.explain import Explainer, ExplainQuery, ExplainResult
from albef.service.schemas import (
    ErrorResponse,
    ExplainLayer,
    ExplainRequest,
    ExplainResponse,
    ExplainTimings,
    WordHeatmap,
)
from albef.service.uploads import UploadForm

router = APIRouter(prefix="/v1", tags=["explain"])

_FORM_FIELDS = ("text", "item_id", "per_word", "overlay")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 413, 415, 422, 503)
}
_ERRORS[409] = {
    "model": ErrorResponse,
    "description": "the served model bundle has no explain graph (exported before bundle format 2)",
}
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ExplainRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1},
                        "image": {"type": "string", "format": "binary"},
                        "item_id": {"type": "integer", "minimum": 0},
                        "per_word": {"type": "boolean"},
                        "overlay": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                }
            },
        },
    }
}


def _explain_form(form: FormData) -> dict[str, Any]:
    """The multipart fields of ``/v1/explain`` as the request's input: the text even when empty (the model
    refuses it then), the other fields when given; a file in place of a field is a 422."""
    fields: dict[str, Any] = {}
    for key in _FORM_FIELDS:
        value = form.get(key)
        if isinstance(value, str) and (value != "" or key == "text"):
            fields[key] = value
        elif value is not None and not isinstance(value, str):
            raise ApiError(422, "validation_error", f"{key}: must be a form field", field=key)
    return fields


_UPLOAD = UploadForm(ExplainRequest, _FORM_FIELDS, _explain_form)


def _grid(a: Any) -> list[list[float]]:
    return [[float(x) for x in row] for row in a]


def _response(
    result: ExplainResult, body: ExplainRequest, info: dict[str, Any], version: str, bundle_id: str
) -> ExplainResponse:
    maps = result.heatmaps
    words = None
    if body.per_word:
        words = [
            WordHeatmap(token=tok, position=i + 1, grid=_grid(maps.per_token[i + 1]))
            for i, tok in enumerate(result.tokens)
        ]
    width, height = result.overlay_size or (None, None)
    return ExplainResponse(
        side=maps.side,
        grid=_grid(maps.overall),
        tokens=result.tokens,
        words=words,
        itm_score=float(result.logits[1]),
        match_probability=result.probability,
        layer=ExplainLayer(fusion_layer=int(info["fusion_layer"]), encoder_layer=int(info["encoder_layer"])),
        overlay_png_base64=result.overlay_png,
        overlay_width=width,
        overlay_height=height,
        overlay_on=result.overlay_on,  # type: ignore[arg-type]
        query=result.query,
        timings_ms=ExplainTimings(**result.timings_ms),
        index_version=version,
        bundle_id=bundle_id,
    )


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=_ERRORS,
    summary="why a text matches an image: a Grad-CAM heat map over the image patches",
    openapi_extra=_OPENAPI,
)
async def explain(
    request: Request, settings: SettingsDep, reader: ReaderDep, engine: EngineDep
) -> ExplainResponse:
    body, data = await _UPLOAD.parse(request, settings.max_upload_bytes)
    if len(body.text) > settings.max_text_chars:
        raise ApiError(
            422, "text_too_long", f"text: at most {settings.max_text_chars} characters", field="text"
        )
    bundle = engine.bundle
    info = getattr(bundle, "explain_info", None)
    if info is None:
        raise ApiError(
            409,
            "explain_unavailable",
            "the served model bundle has no explain graph (bundle format 1); re-export it with `albef export` "
            "and rebuild the index with the new bundle",
        )
    explainer: Explainer = request.app.state.explainer
    query = ExplainQuery(
        text=body.text, item_id=body.item_id, image=data, per_word=body.per_word, overlay=body.overlay
    )
    result = await explainer.explain(engine, reader, query)
    return _response(result, body, info, reader.version, bundle.bundle_id)
