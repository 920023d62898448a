"""Load at and beyond saturation (issue 9.3): ``albef serve`` in one process, ``bench/loadgen.py`` in another.

The server runs with a small per-stage queue (``--queue-max``, default 8) so that the last phases, with
more closed-loop clients than the queues hold, are past saturation and must be answered with 503 +
``Retry-After`` rather than with growing latency or memory. Each phase (``--phases``, concurrency:seconds)
is one loadgen process; the server's RSS (``/proc/PID/status``) is sampled every 0.2 s throughout.

The phase list runs ``--cycles`` times (default 2). Memory criterion: RSS grows with concurrency while ONNX
Runtime's arena and the thread pools reach the batch shapes of the highest load (and keeps that memory for
reuse), so the first cycle is the warm-up; the RSS at the end of the last cycle may exceed the RSS at the
end of the first by at most ``--rss-bound-mib`` (default 32 MiB): the same load again must not cost more
memory. Writes
``bench/results/load.json``: per phase the requests, answers by status, error codes, transport errors,
p50/p99 latency of the 200s and of the 503s (the time to a 503: admission at the door refuses a search before
it spends decode or encoder time, issue 15), throughput, RSS at its start and end; the server's refusals by
stage (``albef_queue_rejections_total``: ``search`` is the door, any other a stage queue); overall memory at
start and end; the load average of the (shared) machine before and after.

    python bench/bench_load.py                                # about 2 minutes with the build
    python bench/bench_load.py --phases 1:5,32:10 --queue-max 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_service import Server, make_bundle, make_index  # noqa: E402 - bench/ is not a package

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parse_phases(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        c, _, s = part.partition(":")
        out.append((int(c), float(s or 10)))
    if not out or any(c < 1 or s <= 0 for c, s in out):
        raise SystemExit(f"--phases: expected concurrency:seconds,... got {text!r}")
    return out


def rejections_by_stage(metrics_text: str) -> dict[str, float]:
    """``albef_queue_rejections_total`` per stage from the server's /metrics."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("albef_queue_rejections_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.rsplit(" ", 1)[1])
    return out


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--bundle", type=Path, default=None, help="model bundle (default: random albef-tiny exported)"
    )
    p.add_argument("--index", type=Path, default=None, help="index (default: built from a synthetic set)")
    p.add_argument("--images", type=int, default=400, help="synthetic images for the default index")
    p.add_argument("--phases", default="1:5,4:5,16:8,64:10,128:8", help="concurrency:seconds,...")
    p.add_argument("--cycles", type=int, default=2, help="times the phase list runs (the first warms up)")
    p.add_argument("--queue-max", type=int, default=8, help="ALBEF_QUEUE_MAX of the server")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="ALBEF_MAX_IN_FLIGHT (default: the server's, = queue max)",
    )
    p.add_argument("--batch-max-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of the server")
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--image-share", type=float, default=0.25, help="share of image->text uploads")
    p.add_argument("--rss-bound-mib", type=float, default=32.0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "load.json")
    args = p.parse_args()
    phases = parse_phases(args.phases)
    if args.cycles < 1:
        p.error("--cycles must be at least 1")

    with tempfile.TemporaryDirectory(prefix="albef-bench-load-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        bundle = args.bundle or make_bundle(work, None)
        index = args.index or make_index(work, bundle, args.images)
        setup_s = time.perf_counter() - t0
        env = {
            "ALBEF_QUEUE_MAX": str(args.queue_max),
            "ALBEF_BATCH_MAX_SIZE": str(args.batch_max_size),
            "ALBEF_THREADS": str(args.threads),
            "ALBEF_RELOAD_INTERVAL_S": "0",
            **({"ALBEF_MAX_IN_FLIGHT": str(args.max_in_flight)} if args.max_in_flight else {}),
        }
        load_before = os.getloadavg()
        server = Server(index, bundle, env)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        results: list[dict[str, Any]] = []
        try:
            pid = server.proc.pid
            with httpx.Client(base_url=server.url, timeout=60) as c:  # warm-up outside the measurement
                for i in range(8):
                    c.post("/v1/search/images", json={"text": f"a red circle {i}", "rerank_k": args.rerank_k})
            rss_start = rss_bytes(pid)
            t_run = time.perf_counter()

            def sample() -> None:
                while not stop.is_set():
                    samples.append((time.perf_counter() - t_run, rss_bytes(pid)))
                    stop.wait(0.2)

            threading.Thread(target=sample, daemon=True).start()
            cycle_end: list[int] = []
            for cycle in range(args.cycles):
                for i, (conc, secs) in enumerate(phases):
                    out = work / f"phase{cycle}-{i}.json"
                    rss_a = rss_bytes(pid)
                    subprocess.run(
                        [
                            sys.executable,
                            str(HERE / "loadgen.py"),
                            "--url",
                            server.url,
                            "--concurrency",
                            str(conc),
                            "--duration",
                            str(secs),
                            "--requests",
                            "10000000",
                            "--rerank-k",
                            str(args.rerank_k),
                            "--image-share",
                            str(args.image_share),
                            "--seed",
                            str(100 * cycle + i),
                            "--out",
                            str(out),
                        ],
                        check=True,
                        timeout=secs + 300,
                    )
                    res = json.loads(out.read_text())
                    res["cycle"] = cycle
                    res["rss_mib"] = {"start": mib(rss_a), "end": mib(rss_bytes(pid))}
                    results.append(res)
                    print(
                        f"cycle {cycle} c={conc:<4} {res['requests']:>6} requests {res['by_status']} "  # noqa: T201
                        f"200s p50 {res['latency_ms']['p50']} ms p99 {res['latency_ms']['p99']} ms; "
                        f"503s p50 {res['latency_503_ms']['p50']} ms p99 {res['latency_503_ms']['p99']} ms; "
                        f"rss {res['rss_mib']['end']} MiB",
                        flush=True,
                    )
                cycle_end.append(rss_bytes(pid))
            rss_end = rss_bytes(pid)
            healthy = httpx.get(server.url + "/readyz", timeout=30).status_code == 200
            refusals = rejections_by_stage(httpx.get(server.url + "/metrics", timeout=30).text)
        finally:
            stop.set()
            server.stop()
        load_after = os.getloadavg()

    warm = mib(cycle_end[0])
    growth = round(mib(cycle_end[-1]) - warm, 1)
    totals: dict[str, int] = {}
    for r in results:
        for s, n in r["by_status"].items():
            totals[s] = totals.get(s, 0) + n
    report = {
        "what": "closed-loop load on loopback: albef serve (one process) vs bench/loadgen.py (another process)",
        "command": "python bench/bench_load.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "note": "shared machine: other jobs ran at the same time (see the load averages)",
        },
        "cycles": args.cycles,
        "server": {
            "queue_max": args.queue_max,
            "max_in_flight": args.max_in_flight or args.queue_max,
            "batch_max_size": args.batch_max_size,
            "threads": args.threads,
            "bundle": "given" if args.bundle else "random albef-tiny",
            "index": "given" if args.index else f"synthetic, {args.images} images (Flat)",
        },
        "setup_s": round(setup_s, 1),
        "phases": results,
        "totals": {
            "requests": sum(r["requests"] for r in results),
            "by_status": dict(sorted(totals.items())),
            "server_errors_other_than_503": sum(r["server_errors_other_than_503"] for r in results),
            "transport_errors": sum(sum(r["transport_errors"].values()) for r in results),
            "missing_retry_after": sum(r["missing_retry_after"] for r in results),
        },
        "refusals_by_stage": refusals,
        "admission": [
            {
                "cycle": r["cycle"],
                "concurrency": r["concurrency"],
                "share_503": round(r["by_status"].get("503", 0) / r["requests"], 3)
                if r["requests"]
                else None,
                "time_to_503_ms": r["latency_503_ms"],
                "accepted_latency_ms": {q: r["latency_ms"][q] for q in ("p50", "p99")},
                "accepted_server_total_ms": r["server_total_ms"],
                "throughput_ok_rps": r["throughput_ok_rps"],
            }
            for r in results
        ],
        "memory_mib": {
            "start": mib(rss_start),
            "end_of_each_cycle": [mib(v) for v in cycle_end],
            "end": mib(rss_end),
            "max": mib(max(v for _, v in samples)) if samples else None,
            "growth_after_warm_up_cycle": growth,
            "bound": args.rss_bound_mib,
            "within_bound": growth <= args.rss_bound_mib,
            "samples_every_0_2s": [[round(t, 1), mib(v)] for t, v in samples[::5]],
        },
        "healthy_after": healthy,
    }
    write_result(args.out, report)
    print(json.dumps({k: report[k] for k in ("totals", "refusals_by_stage", "memory_mib")}, indent=2)[:2000])  # noqa: T201
    print(f"wrote {args.out}")  # noqa: T201
    ok = (
        report["totals"]["server_errors_other_than_503"] == 0
        and report["totals"]["transport_errors"] == 0
        and report["totals"]["missing_retry_after"] == 0
        and report["memory_mib"]["within_bound"]
        and healthy
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
