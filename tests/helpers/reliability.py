"""Helpers for the reliability and security tests (issue 9): a service run as a separate process (so that it
can be SIGKILLed and its memory measured), error-body checks, and reference answers of a pinned index version.

The index is the ``service_index`` fixture (tests/conftest.py) and the in-thread server is
:func:`tests.helpers.service.live_server`; nothing here duplicates them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import REPO
from tests.helpers.readiness import wait_until_ready

# What must never appear in an error body: stack traces, exception reprs, file system paths, source files.
_LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/|/home/|/root/|/usr/|/proc/|/etc/"
    r"|Errno|Exception\(|Error\(|0x[0-9a-f]{6,}",
    re.IGNORECASE,
)


def assert_error(
    r: httpx.Response,
    status: int,
    code: str | None = None,
    field: str | None = None,
    *,
    secrets: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``r`` is the documented error: ``status``, JSON ``{"error": {"code", "message"}}``, no leaks."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    err = r.json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"].strip()
    if code is not None:
        assert err["code"] == code, err
    if field is not None:
        assert err.get("field") == field, err
    # The client's own request path may be echoed ("no route /v1/x/../y"); it is not a server path.
    assert_no_leak(r.text.replace(r.request.url.path, "<path>"), secrets)
    return err


def assert_no_leak(body: str, secrets: tuple[str, ...] = ()) -> None:
    m = _LEAKS.search(body)
    assert m is None, f"error body leaks {m.group(0)!r}: {body[:300]}"
    for s in secrets:
        assert s not in body, f"error body contains {s!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """``albef serve`` in a child process on a free loopback port (real CLI, real uvicorn)."""

    def __init__(
        self, index_dir: Path, *, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> None:
        self.index_dir = Path(index_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ALBEF_LOG_LEVEL": "WARNING", "ALBEF_THREADS": "1", **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "albef",
                "serve",
                "--index",
                str(self.index_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=out,
            stderr=out,
            cwd=REPO,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 90.0) -> dict[str, Any]:
        """Poll /readyz until 200 (returns its body); fails if the process dies or time runs out."""
        return wait_until_ready(self.url, proc=self.proc, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answer(body: dict[str, Any]) -> list[tuple[int, float]]:
    """The part of a search response that must equal the reference: ids with their ranking scores."""
    return [
        (h["id"], h["itm_score"] if h["itm_score"] is not None else h["itc_score"]) for h in body["results"]
    ]


def same_answer(a: list[tuple[int, float]], b: list[tuple[int, float]], tol: float = 1e-4) -> bool:
    """Same ids in the same order, scores equal up to float noise (batched vs single model calls)."""
    return [i for i, _ in a] == [i for i, _ in b] and all(
        abs(x - y) <= tol for (_, x), (_, y) in zip(a, b, strict=False)
    )


def reference_answers(
    index_dir: Path, version: str, bundle_dir: Path, texts: list[str], *, k: int, rerank_k: int
) -> dict[str, list[tuple[int, float]]]:
    """Text->image answers of index ``version`` computed offline: the runtime bundle and a reader pinned to
    that version, through the service's search logic without HTTP, batching or hot swaps."""
    from albef.index import IndexReader
    from albef.model.runtime import Bundle
    from albef.service.engine import SearchEngine, Stages

    bundle = Bundle.load(bundle_dir, intra_op_threads=1)
    stages = Stages(bundle, batch_max_size=1)
    try:
        engine = SearchEngine(bundle, stages)
        with IndexReader.open(index_dir, version=version, bundle_id=bundle.bundle_id) as reader:

            async def run() -> dict[str, list[tuple[int, float]]]:
                out = {}
                for t in texts:
                    res = await engine.search(reader, "t2i", text=t, k=k, rerank=True, rerank_k=rerank_k)
                    out[t] = list(zip(res.ids, res.itm, strict=True))
                return out

            return asyncio.run(run())
    finally:
        stages.close()
