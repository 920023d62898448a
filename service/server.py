"""Run an app on uvicorn and announce its URL only once the socket accepts connections.

uvicorn starts listening at the end of its start-up (after the lifespan has started); a URL printed before
that is a race for whoever reads it (a script connecting at once gets "connection refused"). Both
``albef serve`` and ``albef demo`` go through :func:`run`, whose ``on_listening`` callback runs after the
listening sockets exist. ``/readyz`` is a separate, later signal: it says 200 once the bundle and the index
are loaded, which happens in the background after the socket is open.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import uvicorn

__all__ = ["public_url", "run"]


def public_url(host: str, port: int) -> str:
    """The URL to show for a bound address (a wildcard bind is shown as loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/"


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_listening: Callable[[str], None] | None) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit or self._on_listening is None:
            return
        bound = [s.getsockname() for server in self.servers for s in (server.sockets or ())]
        host = self.config.host if sockets is None else sockets[0].getsockname()[0]
        port = bound[0][1] if bound else self.config.port
        self._on_listening(public_url(host, port))


def run(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sock: socket.socket | None = None,
    on_listening: Callable[[str], None] | None = None,
    timeout_graceful_shutdown: int = 10,
) -> None:
    """Serve ``app`` until stopped (SIGINT/SIGTERM). ``sock``: an already bound socket to listen on (its
    address wins over host/port); ``on_listening(url)`` runs once connections are accepted."""
    # log_config=None keeps our JSON logging; uvicorn's own loggers propagate to the root handler.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )
    server = _AnnouncingServer(config, on_listening)
    server.run(sockets=[sock] if sock is not None else None)
