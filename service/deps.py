"""Dependencies of the routes, as ``Annotated`` aliases (the full-stack-fastapi-template pattern)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from albef.service.engine import SearchEngine
from albef.service.errors import NotReadyError
from albef.service.metrics import Metrics
from albef.service.protocols import IndexView
from albef.service.state import ServiceState
from albef.settings import Settings

__all__ = ["StateDep", "SettingsDep", "MetricsDep", "ReaderDep", "EngineDep"]


# All async: they are trivial, and sync dependencies would each cost a thread-pool hop per request.
async def get_state(request: Request) -> ServiceState:
    return request.app.state.albef


async def get_settings(request: Request) -> Settings:
    return request.app.state.albef.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.albef.metrics


async def lease_reader(state: Annotated[ServiceState, Depends(get_state)]) -> AsyncIterator[IndexView]:
    """The index reader for this request; a hot swap during the request does not affect it."""
    with state.lease() as reader:
        yield reader


async def get_engine(state: Annotated[ServiceState, Depends(get_state)]) -> SearchEngine:
    if state.engine is None:
        raise NotReadyError(f"not ready: {state.status}")
    return state.engine


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ReaderDep = Annotated[IndexView, Depends(lease_reader)]
EngineDep = Annotated[SearchEngine, Depends(get_engine)]
