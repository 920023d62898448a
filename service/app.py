"""The FastAPI application: ``create_app(settings)``.

The lifespan starts the loader/poller (:meth:`ServiceState.run`): the bundle and the index load in a worker
thread after start-up, then the index's ``current`` pointer is polled for hot swaps. Middlewares, outermost
first: CORS (only if ``cors_origins``), metrics, API key (only if ``api_key``), body limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from albef import __version__
from albef.service import errors, web
from albef.service.explain import Explainer
from albef.service.images import configure_pillow
from albef.service.metrics import Metrics
from albef.service.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    SearchDoorMiddleware,
)
from albef.service.routes import explain, health, index, items, metrics, search
from albef.service.state import ServiceState
from albef.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, *, state: ServiceState | None = None) -> FastAPI:
    settings = settings or Settings()
    state = state or ServiceState(settings, Metrics())
    configure_pillow(settings.max_image_pixels)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.run(), name="albef-loader")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(state.close)

    app = FastAPI(
        title="albef-search",
        version=__version__,
        description="Image-text retrieval: FAISS over ALBEF ITC embeddings, re-ranked by the ITM head.",
        lifespan=lifespan,
        # operationId = the handler's name (search_images, get_item, ...): short and stable for generated clients
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.albef = state
    # POST /v1/explain's own bound on concurrent explanations (its encoders are the search's stages).
    app.state.explainer = Explainer(settings.queue_max, settings.retry_after_s, metrics=state.metrics)
    errors.install(app)
    for module in (health, search, explain, items, index, metrics):
        app.include_router(module.router)
    # The web search page at "/" and "/static" (albef demo, issue 7): plain files; see service/web.py.
    web.install(app)

    # add_middleware wraps: the last one added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    # the search door: inside the key check, before anything reads the body
    searches = frozenset(r.path for r in search.router.routes if "POST" in getattr(r, "methods", ()))
    app.add_middleware(SearchDoorMiddleware, state=state, paths=searches)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(
        MetricsMiddleware, metrics=state.metrics, routes_of=app, access_log=settings.access_log
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization"],
            max_age=600,
        )
    return app
