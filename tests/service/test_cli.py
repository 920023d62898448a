"""``albef serve`` as a real process (torch never loaded, API key, CORS, clean shutdown), its one-line errors,
and the ALBEF_ settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from albef.cli import main
from albef.settings import Settings
from tests.helpers.readiness import accepts_connections, wait_until_ready
from tests.helpers.service import live_server, settings

KEY = "s3cret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_process(service_index: Path):
    """``python -m albef serve`` on a free port, with the API key and two CORS origins from the environment."""
    port = _free_port()
    env = {
        **os.environ,
        "ALBEF_API_KEY": KEY,
        "ALBEF_CORS_ORIGINS": "http://a.example, http://b.example",
        "ALBEF_THREADS": "1",
        "ALBEF_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "albef", "serve", "--index", str(service_index), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, proc=proc, timeout=120)
        except AssertionError as exc:
            tail = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
            raise AssertionError(f"{exc}: {tail}") from exc
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_announces_its_url_once_the_socket_accepts(service_index: Path) -> None:
    """``albef serve --port 0 --variant int8``: the "listening" log line carries the real URL, and it is
    written only after the socket accepts connections (a connect right after it, without retry, succeeds).
    The start-up log names this CPU's flags and the int8 figures the export validated."""
    from albef.cpu import cpu_info

    env = {**os.environ, "ALBEF_API_KEY": "", "ALBEF_THREADS": "1", "ALBEF_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "albef",
            "serve",
            "--index",
            str(service_index),
            "--port",
            "0",
            "--variant",
            "int8",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, loaded = None, None
        for line in proc.stderr:
            msg = json.loads(line) if line.startswith("{") else {}
            if msg.get("msg") == "listening":
                url = msg["url"]
                assert accepts_connections(url)
            elif msg.get("msg") == "bundle loaded":
                loaded = msg
                break
        assert url and url.startswith("http://127.0.0.1:") and not url.endswith(":0/"), url
        assert loaded is not None and loaded["variant"] == "int8"
        assert loaded["cpu"]["flags"] == cpu_info()["flags"] and "avx2" in loaded["cpu"]["flags"]
        assert loaded["validated_on"]["model"] == cpu_info()["model"]
        assert (
            loaded["validated"]["max_int8_weight"] <= 64 and loaded["validated"]["text_emb_min_cos"] >= 0.995
        )
        assert loaded["validation_bounds"]["min_embedding_cos"] == 0.995
        body = wait_until_ready(url, proc=proc, timeout=120)
        assert body["status"] == "ready"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_process_never_loads_torch_and_enforces_the_key(serve_process) -> None:
    proc, url = serve_process
    with httpx.Client(base_url=url, timeout=30) as c:
        # the probes are open; everything else needs the key
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for method, path in (
            ("GET", "/v1/index"),
            ("GET", "/metrics"),
            ("GET", "/v1/items/0"),
            ("POST", "/v1/search/images"),
            ("GET", "/docs"),
            ("GET", "/nowhere"),
        ):
            r = c.request(method, path, json={"text": "a red circle"} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/index", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/index", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert c.get("/v1/index", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
        assert c.get("/v1/index", headers={"X-API-Key": KEY}).status_code == 200
        r = c.post(
            "/v1/search/images",
            json={"text": "a red circle", "k": 3},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        # CORS: allowed origins get the header on preflight and on responses; others do not
        pre = c.options(
            "/v1/search/images",
            headers={
                "Origin": "http://b.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key,content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://b.example"
        bad = c.options(
            "/v1/search/images",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in bad.headers
        r = c.get("/v1/index", headers={"X-API-Key": KEY, "Origin": "http://a.example"})
        assert r.headers["access-control-allow-origin"] == "http://a.example"
    # torch is never loaded by the serving process (its shared library would be mapped)
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "onnxruntime" in maps
    # graceful shutdown on SIGTERM (uvicorn re-raises the signal once shut down, hence -SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in proc.stderr.read().decode()


def test_cors_is_off_by_default(service_index: Path) -> None:
    with live_server(settings(service_index)) as srv, srv.client() as c:
        pre = c.options(
            "/v1/search/images",
            headers={"Origin": "http://a.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in pre.headers and pre.status_code == 405
        r = c.get("/v1/index", headers={"Origin": "http://a.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_serve_errors_are_one_line(
    service_index: Path,
    other_bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rc, err = _run_cli(["serve", "--index", str(tmp_path / "missing")], capsys)
    assert rc == 1 and err == f"albef serve: error: index folder not found: {tmp_path / 'missing'}"
    rc, err = _run_cli(["serve", "--index", str(service_index), "--model", str(other_bundle_dir)], capsys)
    assert rc == 1 and "was built with model bundle" in err and "\n" not in err
    rc, err = _run_cli(["serve", "--index", str(service_index), "--model", str(tmp_path)], capsys)
    assert rc == 1 and "not a model bundle" in err and "\n" not in err
    monkeypatch.setenv("ALBEF_PORT", "eighty")
    rc, err = _run_cli(["serve", "--index", str(service_index)], capsys)
    assert rc == 2 and err.startswith("albef serve: error: invalid setting port") and "\n" not in err
    monkeypatch.delenv("ALBEF_PORT")
    monkeypatch.delenv("ALBEF_INDEX_DIR", raising=False)
    rc, err = _run_cli(["serve"], capsys)
    assert rc == 2 and "--index" in err


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALBEF_INDEX_DIR", str(tmp_path))
    monkeypatch.setenv("ALBEF_BATCH_MAX_SIZE", "4")
    monkeypatch.setenv("ALBEF_BATCH_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("ALBEF_QUEUE_MAX", "9")
    monkeypatch.setenv("ALBEF_CORS_ORIGINS", "http://a.example,http://b.example")
    monkeypatch.setenv("ALBEF_API_KEY", "zebra-42")
    s = Settings()
    assert (
        s.index_dir == tmp_path and s.batch_max_size == 4 and s.batch_max_wait_ms == 7.5 and s.queue_max == 9
    )
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "zebra-42" and "zebra" not in repr(s)
    monkeypatch.setenv("ALBEF_CORS_ORIGINS", '["http://c.example"]')
    monkeypatch.setenv("ALBEF_API_KEY", "")
    s = Settings()
    assert s.cors_origins == ["http://c.example"] and s.api_key is None  # empty key = no key
    assert Settings(port=9000).port == 9000  # explicit values (CLI flags) win over the environment
    monkeypatch.setenv("ALBEF_DEFAULT_K", "500")
    with pytest.raises(ValueError, match="default_k"):
        Settings()
    monkeypatch.delenv("ALBEF_DEFAULT_K")
    monkeypatch.setenv("ALBEF_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValueError, match="batch_max_size"):
        Settings()
