"""Helpers of the service tests: service settings for tests, a real uvicorn server on 127.0.0.1 (a free port)
run in a background thread, index copies and items. The synthetic split and its index (``service_synth``,
``service_index``) are fixtures of tests/conftest.py, ``agreement_setup`` one of tests/service/conftest.py.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.readiness import wait_until_ready


@dataclass
class ModelSetup:
    checkpoint: Path  # for the torch model of the official evaluation
    bundle: Path  # the same weights exported for the service
    index: Path  # the synthetic test split indexed with that bundle
    trained: bool


def copy_index(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "work"))
    return dst


def settings(index_dir: Path | None, **overrides: Any) -> Any:
    """Service settings for tests: loopback, fast polling, everything else as given."""
    from albef.settings import Settings

    values: dict[str, Any] = {
        "index_dir": index_dir,
        "host": "127.0.0.1",
        "port": 0,
        "threads": 1,
        "reload_interval_s": 0,
    }
    values.update(overrides)
    return Settings(**values)


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.albef

    def start(self, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            wait_until_ready(self.url, timeout=timeout, poll_s=0.02)
        except AssertionError as exc:
            raise RuntimeError(f"the test server is not ready: {self.state.status}") from exc

    def client(self, **kwargs: Any) -> httpx.Client:
        # TCP_NODELAY: httpx writes headers and body separately; with Nagle + delayed ACK that costs 40 ms.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        return httpx.Client(
            base_url=self.url, timeout=kwargs.pop("timeout", 30), transport=transport, **kwargs
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()


@contextlib.contextmanager
def live_server(settings_obj: Any, *, ready: bool = True) -> Iterator[LiveServer]:
    """Start ``create_app(settings_obj)`` on uvicorn; wait until /readyz says 200 unless ``ready=False``."""
    from albef.service.app import create_app

    srv = LiveServer(create_app(settings_obj)).start()
    try:
        if ready:
            srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def index_items(index_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(images, texts) of the current index version, each in ascending id order."""
    import sqlite3

    from albef.index import IndexReader

    with IndexReader.open(index_dir) as reader:
        vdir = Path(index_dir) / "versions" / reader.version
        conn = sqlite3.connect(f"file:{vdir / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM items ORDER BY id")]
        finally:
            conn.close()
        items = reader.items(ids)
    return [it for it in items if it["kind"] == "image"], [it for it in items if it["kind"] == "text"]
