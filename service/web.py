"""The web search page: ``GET /`` (index.html) and ``/static/*`` (its CSS, JS and icon), from ``static/``.

Plain files, no build step, nothing loaded from elsewhere: a Content-Security-Policy of ``'self'`` keeps the
page offline-only. The page holds no data, so ``/`` and ``/static/`` are open even when an API key protects
the API (see ``OPEN_PATHS`` in middleware.py); the page asks for the key and sends it as ``X-API-Key``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "PAGE_CSP", "install"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    # no-cache: the browser revalidates, so a new version of the page shows after an upgrade.
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets at ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
