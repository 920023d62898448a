"""Errors of the HTTP API and their handlers. Every error body is ``{"error": {"code", "message", ...}}``.

Client errors are 4xx with a stable ``code``; validation errors (FastAPI's 422) are reshaped to name the
field. The search's own errors (:mod:`albef.service.domain_errors`) get their status codes here. Anything
unexpected becomes a 500 with a generic message: no stack trace, exception text or file path ever reaches a
response body (it is logged instead).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from albef.service.domain_errors import (
    BadQuery,
    NotFound,
    Overloaded,
    SearchError,
    TooLarge,
    UnsupportedFormat,
)

log = logging.getLogger(__name__)

__all__ = [
    "ApiError",
    "NotReadyError",
    "PayloadTooLargeError",
    "api_error",
    "error_body",
    "install",
    "document_errors",
]


class ApiError(Exception):
    """An error with an HTTP status, a machine-readable code and a message safe to show to clients."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


class NotReadyError(ApiError):
    def __init__(self, message: str = "the model or the index is not loaded yet") -> None:
        super().__init__(503, "not_ready", message, headers={"Retry-After": "5"})


class PayloadTooLargeError(StarletteHTTPException):
    """Raised while the body is read (it subclasses HTTPException so FastAPI's body parsing re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")
        self.limit = limit


# Most specific first: the first class an error is an instance of gives its status.
_SEARCH_STATUS: tuple[tuple[type[SearchError], int], ...] = (
    (Overloaded, 503),
    (NotFound, 404),
    (TooLarge, 413),
    (UnsupportedFormat, 415),
    (BadQuery, 422),
)


def api_error(exc: SearchError) -> ApiError:
    """The HTTP form of a search error: its status code, and Retry-After when overloaded."""
    status = next((s for cls, s in _SEARCH_STATUS if isinstance(exc, cls)), 422)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return ApiError(status, exc.code, exc.message, field=exc.field, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


def _loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "k") -> "k"; ("query", "limit") -> "limit"; ("body",) -> "body"
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "form", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic errors without their ``input``/``ctx`` (they may echo big or private payloads)."""
    return [
        {
            "field": _loc_to_field(e.get("loc", ())),
            "message": str(e.get("msg", "invalid value")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(
        error_body(exc.code, exc.message, field=exc.field), status_code=exc.status, headers=exc.headers
    )


async def _search_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SearchError)
    return await _api_error(request, api_error(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        # FastAPI puts the byte offset into loc; name the body instead.
        return JSONResponse(
            error_body("validation_error", "body: invalid JSON", field="body"), status_code=422
        )
    details = validation_details(raw)
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}"
    return JSONResponse(
        error_body("validation_error", message, field=first["field"], details=details), status_code=422
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error" if exc.status_code >= 500 else "bad_request")
    detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}"
    if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's body parser
        detail = "body: could not be parsed (not valid UTF-8 JSON, or a malformed form)"
    return JSONResponse(error_body(code, detail), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path, "method": request.method})
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(SearchError, _search_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    document_errors(app)


_OPEN_PATHS = (
    "/healthz",
    "/readyz",
    "/",
)  # as ApiKeyMiddleware's OPEN_PATHS (static files are not in the doc)
# The key (when the service runs with ALBEF_API_KEY) goes in either header; without a key nothing is checked.
_SECURITY_SCHEMES = {
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "the service's ALBEF_API_KEY (required only when it is set)",
    },
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "the same key as `Authorization: Bearer KEY`",
    },
}
_SECURITY = [{"apiKey": []}, {"bearer": []}]
_ERROR_DESCRIPTIONS = {
    400: "malformed request (e.g. an unparsable body)",
    401: "API key missing or wrong (when ALBEF_API_KEY is set)",
    404: "not found",
    413: "body, upload or image too large",
    415: "unsupported content type",
    422: "invalid input (the field is named)",
    503: "not ready, or overloaded (Retry-After)",
}


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API really answers on errors: every 4xx/503 has the
    ``{"error": {"code", "message"}}`` body (FastAPI would document 422 as its own HTTPValidationError),
    and the statuses that the middlewares and the body parser can produce are declared on every operation
    they apply to, so that schema-conformance checks (schemathesis) hold."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, ops in spec.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                codes: set[int] = {int(c) for c in responses if str(c).isdigit() and int(c) >= 400}
                if path not in _OPEN_PATHS:
                    codes.add(401)
                if path.startswith("/v1/"):
                    codes.add(503)
                if "requestBody" in op:
                    codes.update((400, 413, 415, 422))
                if any(p.get("in") == "path" for p in op.get("parameters", [])):
                    codes.update((404, 422))
                if path not in _OPEN_PATHS:
                    op["security"] = _SECURITY
                for code in sorted(codes):
                    entry = responses.setdefault(str(code), {})
                    entry["description"] = entry.get("description") or _ERROR_DESCRIPTIONS.get(code, "error")
                    if entry["description"] in ("Validation Error", "Successful Response"):
                        entry["description"] = _ERROR_DESCRIPTIONS.get(code, "error")
                    entry["content"] = ref
        spec.setdefault("components", {})["securitySchemes"] = _SECURITY_SCHEMES
        schemas = spec.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
