"""Pure ASGI middlewares: API key, the search door, request body limit, request metrics with the access log
and request ids.

Pure ASGI (not ``BaseHTTPMiddleware``) so that they add no task or stream copies per request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from albef.service.domain_errors import Overloaded
from albef.service.errors import PayloadTooLargeError, api_error, error_body
from albef.service.metrics import Metrics

Scope = dict[str, Any]
ASGIApp = Any
access_log = logging.getLogger("albef.access")

# Probes stay open so that orchestrators can check the service without the key. The web page ("/" and
# "/static/...", service/web.py) holds no data and must load so that the user can type the key into it.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/static/",)


async def _send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


class ApiKeyMiddleware:
    """Every path but the probes needs ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``.

    Compared with hmac.compare_digest (constant time); CORS preflights (OPTIONS) pass so the CORS
    middleware outside can answer them."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _authorised(self, scope: Scope) -> bool:
        given = _header(scope, b"x-api-key")
        if given is None:
            auth = _header(scope, b"authorization")
            if auth is not None and auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(OPEN_PREFIXES)
            or scope["method"] == "OPTIONS"
            or self._authorised(scope)
        ):
            await self.app(scope, receive, send)
            return
        await _send_json(
            send,
            401,
            error_body(
                "unauthorized", "a valid API key is required (X-API-Key header or Authorization: Bearer)"
            ),
            [(b"www-authenticate", b"Bearer")],
        )


class SearchDoorMiddleware:
    """A search that arrives while every search place is taken gets its 503 + Retry-After here, before its
    body is read, routed, validated or tokenized (:meth:`SearchEngine.refuse_if_full`, the engine's rule).

    Why here and not only in the engine: under a flood of clients that retry at once, the event loop reads and
    answers every request, and refused inside the app a request went through routing, validation and the
    exception handlers first (docs/cpu.md has the load figures). The engine's own check stays the one that
    admits."""

    def __init__(self, app: ASGIApp, state: Any, paths: frozenset[str]) -> None:
        self.app = app
        self.state = state  # the ServiceState: its engine appears once the bundle and index are loaded
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        engine = self.state.engine
        if (
            engine is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self.paths
        ):
            try:
                engine.refuse_if_full()
            except Overloaded as exc:
                err = api_error(exc)
                headers = [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
                await _send_json(send, err.status, error_body(err.code, err.message), headers)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes``: at once from Content-Length, else while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, error_body("bad_request", "invalid Content-Length header"))
                return
            if declared > self.max_bytes:
                await _send_json(
                    send,
                    413,
                    error_body("payload_too_large", f"the request body exceeds {self.max_bytes} bytes"),
                )
                return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def match_template(app: Any, scope: Scope) -> str:
    """The template of the first of the app's routes that fully matches this request (``/static/{path}`` for
    a mount), or "unmatched". Run before the request is handled: routing rewrites the scope's paths."""
    from starlette.routing import Match, Mount

    for candidate in getattr(app, "routes", ()):
        if not getattr(candidate, "path", None):
            # An included router (FastAPI wraps them): look at its own routes, whose paths carry the prefix.
            inner = match_template(getattr(candidate, "original_router", None), scope)
            if inner != "unmatched":
                return inner
            continue
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return f"{candidate.path}/{{path}}" if isinstance(candidate, Mount) else str(candidate.path)
    return "unmatched"


def route_template(app: Any, scope: Scope, before: Scope) -> str:
    """API routes name themselves in ``scope["route"]`` once routed; FastAPI's docs and schema routes and
    mounted static files do not, so those (and requests refused before routing) are matched against the
    app's routes with ``before``, the scope as it came in (routing rewrites the paths). A real 404 is
    "unmatched"."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return str(route.path)
    return match_template(app, before)


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is a sane token (at most 128 printable ASCII characters without
    spaces), else a new random one: an id that goes into logs must not carry newlines or megabytes."""
    given = _header(scope, b"x-request-id")
    if given is not None and 0 < len(given) <= 128 and all(33 <= c <= 126 for c in given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class MetricsMiddleware:
    """Per request: a request id (``X-Request-ID`` honoured or generated, echoed in the response), the
    request counter and latency histogram by route template, and one access-log line (unless switched off).

    Outermost but for CORS, so 401s and 413s are counted and logged too."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, routes_of: Any = None, access_log: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes_of = routes_of  # the FastAPI app whose routes name the templates
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        before = {**scope}  # shallow: routing replaces keys, it does not mutate their values

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - t0
            template = route_template(self.routes_of, scope, before)
            self.metrics.requests.labels(method=scope["method"], route=template, status=str(status)).inc()
            self.metrics.request_latency.labels(route=template).observe(seconds)
            if self.access_log:
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                        "request_id": request_id,
                    },
                )
