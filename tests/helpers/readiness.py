"""Waiting for a server the way a client must: poll with connection errors retried, under a deadline.

A log line or an announced URL says where to connect, not that a request will be answered; a sleep says
nothing at all. These helpers are the one way the tests wait for a server."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit

import httpx


def wait_until_ready(
    url: str,
    *,
    proc: subprocess.Popen | None = None,
    timeout: float = 90.0,
    path: str = "/readyz",
    poll_s: float = 0.05,
) -> dict[str, Any]:
    """Poll ``url + path`` until it answers 200 and return its JSON body. Connection errors (nothing
    listening yet) and other statuses are retried; fails when ``proc`` exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=url.rstrip("/"), timeout=10) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode} before it was ready ({last})")
            try:
                r = client.get(path)
                if r.status_code == 200:
                    return r.json()
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}{path} not ready after {timeout} s ({last})")
            time.sleep(poll_s)  # the poll interval, not a stand-in for readiness


def accepts_connections(url: str) -> bool:
    """One TCP connect to the URL's host and port, no retry: True if it was accepted."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=5):
            return True
    except OSError:
        return False
