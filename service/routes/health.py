"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (bundle and index loaded, else 503)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from albef.service.deps import StateDep
from albef.service.errors import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="readiness: 503 until the model bundle and the index are loaded",
    responses={503: {"description": "not ready"}},
)
async def readyz(state: StateDep) -> Any:
    reader = state.reader
    if not state.ready or reader is None:
        return JSONResponse(
            error_body("not_ready", f"not ready: {state.status}"),
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return {"status": "ready", "index_version": reader.version, "bundle_id": state.bundle.bundle_id}
