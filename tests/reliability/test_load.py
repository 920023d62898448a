"""Issue 9.3 (short version; ``bench/bench_load.py`` runs the long one): overload on loopback.

The service runs as its own process (``albef serve``) with a tiny queue (2 per stage) and no batching, so a
second process (``bench/loadgen.py``, 24 closed-loop clients, a few seconds, 30% image uploads) drives it well
past saturation.
Expected: no 5xx but 503, every 503 is the ``overloaded`` error with ``Retry-After``, some requests are
served throughout, the server's RSS grows by less than ``RSS_BOUND`` over the run, and the service answers
normally afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.helpers import REPO
from tests.helpers.reliability import ServerProcess, rss_bytes

RSS_BOUND = 64 * 2**20  # bytes the server may grow by during the short run (allocator warm-up, thread stacks)
CONCURRENCY = 24
DURATION_S = 4.0
MAX_REQUESTS = 3000


def test_overload_is_503_with_retry_after_and_memory_stays_bounded(
    service_index: Path, tmp_path: Path
) -> None:
    env = {
        "ALBEF_QUEUE_MAX": "2",
        "ALBEF_BATCH_MAX_SIZE": "1",
        "ALBEF_BATCH_MAX_WAIT_MS": "0",
        "ALBEF_RETRY_AFTER_S": "2",
        "ALBEF_RELOAD_INTERVAL_S": "0",
    }
    with ServerProcess(service_index, env=env, log_path=tmp_path / "server.log") as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(6):  # warm up the request path before the baseline
                assert (
                    c.post("/v1/search/images", json={"text": f"a red circle {i}", "k": 5}).status_code == 200
                )
        rss_start = rss_bytes(srv.pid)
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_bytes(srv.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = tmp_path / "load.json"
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "bench" / "loadgen.py"),
                    "--url",
                    srv.url,
                    "--concurrency",
                    str(CONCURRENCY),
                    "--duration",
                    str(DURATION_S),
                    "--requests",
                    str(MAX_REQUESTS),
                    "--k",
                    "5",
                    "--rerank-k",
                    "16",
                    "--image-share",
                    "0.3",
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            stop.set()
            sampler.join()
        assert done.returncode == 0, done.stderr[-2000:]
        rss_end = rss_bytes(srv.pid)
        res = json.loads(out.read_text())

        assert res["transport_errors"] == {}, res  # nothing dropped or reset
        assert set(res["by_status"]) <= {"200", "503"}, res["by_status"]
        assert res["server_errors_other_than_503"] == 0
        assert res["by_status"].get("503", 0) > 0, f"the run never saturated the server: {res}"
        assert res["by_status"].get("200", 0) > 0, f"nothing was served under overload: {res}"
        assert res["missing_retry_after"] == 0 and res["error_codes"] == {
            "overloaded": res["by_status"]["503"]
        }
        assert res["latency_ms"]["p99"] is not None and res["latency_503_ms"]["p99"] is not None
        assert max(samples) - rss_start < RSS_BOUND and rss_end - rss_start < RSS_BOUND, (
            rss_start,
            max(samples),
            rss_end,
        )

        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/search/images", json={"text": "a red circle", "k": 5})
            assert r.status_code == 200 and len(r.json()["results"]) == 5
            assert c.get("/readyz").status_code == 200
            metrics = c.get("/metrics").text
        rejected = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("albef_queue_rejections_total{")
        )
        assert rejected == res["by_status"]["503"]
        print(json.dumps({"rss_start": rss_start, "rss_max": max(samples), "rss_end": rss_end, **res}))
    # graceful shutdown on SIGTERM after the overload (uvicorn re-raises the signal once it has shut down),
    # not the SIGKILL that ServerProcess.stop falls back to after 20 s
    assert srv.proc is not None and srv.proc.returncode in (0, -signal.SIGTERM)
