"""Service latency and throughput: both directions, 1/4/16 concurrent clients, micro-batching on/off,
re-ranking on/off. Writes ``bench/results/service.json``.

The server is a real ``albef serve`` process on 127.0.0.1; the clients are asyncio httpx clients in this
process (a separate process from the server). Each configuration runs for ``--duration`` seconds after a
short warm-up. Latency is end to end (HTTP included); the server's own stage timings (``timings_ms``) and the
mean micro-batch sizes (from ``/metrics``) are recorded beside it.

By default the model is the albef-tiny configuration (random weights, or ``--checkpoint``) exported to a
bundle, and the index holds a synthetic set (``--images``); pass ``--bundle``/``--index`` to measure others.
The machine is shared: the load average before and after each server run is recorded with the figures.

    python bench/bench_service.py                 # about 3 minutes
    python bench/bench_service.py --duration 2 --concurrency 1,4   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(work: Path, checkpoint: Path | None) -> Path:
    import torch

    from albef.model.checkpoint import save_albef
    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = work / "ckpt"
        save_albef(create_model("albef-tiny"), checkpoint, source={"init": "random", "seed": 0})
    out = work / "bundle"
    export_bundle(
        create_model(None, checkpoint), out, variants=["fp32"], checkpoint=checkpoint, progress=False
    )
    return out


def make_index(work: Path, bundle: Path, n_images: int) -> Path:
    from albef.index.builder import BuildOptions, build
    from albef.model.data.synth import generate
    from albef.model.runtime import Bundle

    data = work / "synth"
    generate(data, n_images, seed=1, size=96, progress=False)
    out = work / "index"
    # every image with its captions (train.json is one pair per caption; val/test add more)
    build(
        out,
        Bundle.load(bundle),
        [data / "train.json", data / "val.json", data / "test.json"],
        BuildOptions(progress=False),
    )
    return out


def load_queries(index: Path, n: int = 64) -> tuple[list[str], list[bytes]]:
    from albef.index import current_version

    db = index / "versions" / str(current_version(index)) / "meta.sqlite"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        texts = [
            r[0]
            for r in conn.execute("SELECT caption FROM items WHERE kind='text' ORDER BY id LIMIT ?", (n,))
        ]
        paths = [
            r[0] for r in conn.execute("SELECT path FROM items WHERE kind='image' ORDER BY id LIMIT ?", (n,))
        ]
    finally:
        conn.close()
    return texts, [Path(p).read_bytes() for p in paths]


class Server:
    def __init__(self, index: Path, bundle: Path, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "ALBEF_LOG_LEVEL": "WARNING", **env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "albef",
                "serve",
                "--index",
                str(index),
                "--model",
                str(bundle),
                "--port",
                str(self.port),
            ],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)

    def batch_stats(self) -> dict[str, tuple[float, float]]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, list[float]] = {}
        for line in text.splitlines():
            for part, idx in (("albef_batch_size_count{", 0), ("albef_batch_size_sum{", 1)):
                if line.startswith(part):
                    stage = line.split('stage="')[1].split('"')[0]
                    out.setdefault(stage, [0.0, 0.0])[idx] = float(line.split()[-1])
        return {k: (v[0], v[1]) for k, v in out.items()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def run_load(
    url: str,
    direction: str,
    rerank: bool,
    concurrency: int,
    duration: float,
    warmup: float,
    texts: list[str],
    images: list[bytes],
    k: int,
    rerank_k: int,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, transport=transport) as client:

        async def one(i: int) -> tuple[float, int, dict[str, float] | None]:
            t0 = time.perf_counter()
            if direction == "t2i":
                r = await client.post(
                    "/v1/search/images",
                    json={"text": texts[i % len(texts)], "k": k, "rerank": rerank, "rerank_k": rerank_k},
                )
            else:
                r = await client.post(
                    "/v1/search/texts",
                    files={"image": ("q.png", images[i % len(images)], "image/png")},
                    data={"k": str(k), "rerank": str(rerank).lower(), "rerank_k": str(rerank_k)},
                )
            dt = time.perf_counter() - t0
            return dt, r.status_code, (r.json()["timings_ms"] if r.status_code == 200 else None)

        async def worker(w: int, until: float, record: bool) -> None:
            i = w * 7919
            while time.perf_counter() < until:
                dt, status, timings = await one(i)
                i += 1
                if not record:
                    continue
                if status == 200:
                    latencies.append(dt)
                    stages.append(timings or {})
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        await asyncio.gather(*(worker(w, time.perf_counter() + warmup, False) for w in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w, t0 + duration, True) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000.0
    out: dict[str, Any] = {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2),
            "p90": round(float(np.percentile(lat, 90)), 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "mean": round(float(lat.mean()), 2),
        }
        if len(lat)
        else None,
    }
    if stages:
        out["server_stage_ms_mean"] = {
            key: round(float(np.mean([s.get(key, 0.0) for s in stages])), 2)
            for key in ("encode", "ann", "rerank", "total")
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="model bundle (default: export albef-tiny)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint to export (default: random tiny)"
    )
    p.add_argument("--index", type=Path, default=None, help="index built with --bundle (default: synthetic)")
    p.add_argument("--images", type=int, default=1000, help="images of the synthetic index (default 1000)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per configuration (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per configuration")
    p.add_argument("--concurrency", default="1,4,16", help="concurrent clients (default 1,4,16)")
    p.add_argument("--threads", type=int, default=None, help="ALBEF_THREADS of the server (default: ORT's)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--batch-max-size", type=int, default=16)
    p.add_argument("--batch-max-wait-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = p.parse_args()

    random.seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    t_setup = time.perf_counter()
    bundle = args.bundle or make_bundle(work, args.checkpoint)
    index = args.index or make_index(work, bundle, args.images)
    texts, images = load_queries(index)
    setup_s = time.perf_counter() - t_setup
    manifest = json.loads((bundle / "manifest.json").read_text())
    levels = [int(c) for c in args.concurrency.split(",")]

    runs: list[dict[str, Any]] = []
    for batching in (True, False):
        env = {
            "ALBEF_BATCH_MAX_SIZE": str(args.batch_max_size if batching else 1),
            "ALBEF_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
            "ALBEF_QUEUE_MAX": "256",
            "ALBEF_RELOAD_INTERVAL_S": "0",
            "ALBEF_MAX_RERANK_K": str(max(256, args.rerank_k)),
        }
        if args.threads:
            env["ALBEF_THREADS"] = str(args.threads)
        load_before = os.getloadavg()
        server = Server(index, bundle, env)
        try:
            for direction in ("t2i", "i2t"):
                for rerank in (True, False):
                    for conc in levels:
                        before = server.batch_stats()
                        res = asyncio.run(
                            run_load(
                                server.url,
                                direction,
                                rerank,
                                conc,
                                args.duration,
                                args.warmup,
                                texts,
                                images,
                                args.k,
                                args.rerank_k,
                            )
                        )
                        after = server.batch_stats()
                        res["mean_batch_size"] = {
                            stage: round(
                                (after[stage][1] - before.get(stage, (0, 0))[1])
                                / max(1.0, after[stage][0] - before.get(stage, (0, 0))[0]),
                                2,
                            )
                            for stage in after
                            if after[stage][0] > before.get(stage, (0, 0))[0]
                        }
                        res.update(
                            {
                                "direction": direction,
                                "rerank": rerank,
                                "concurrency": conc,
                                "batching": batching,
                            }
                        )
                        runs.append(res)
                        lat = res["latency_ms"] or {}
                        print(
                            f"batching={batching!s:5} {direction} rerank={rerank!s:5} c={conc:2}: "
                            f"{res['throughput_rps']:7.1f} req/s  p50 {lat.get('p50')} ms  p99 {lat.get('p99')} ms"
                            f"  batch {res['mean_batch_size']}  errors {res['errors']}",
                            flush=True,
                        )
        finally:
            server.stop()
        runs[-1]["load_after"] = list(os.getloadavg())
        runs[-len(levels) * 4]["load_before"] = list(load_before)

    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "cpu_load": "shared machine: other jobs ran beside the bench; load averages (1/5/15 min) before and after "
        "each server run are in load_before/load_after",
        "model": {
            "name": manifest["model"]["name"],
            "bundle_id": manifest["bundle_id"],
            "image_res": manifest["model"]["vision"]["image_res"],
            "variant": "fp32",
            "weights": "random" if args.bundle is None and args.checkpoint is None else "given",
        },
        "index": {"images": None, "texts": None},
        "settings": {
            "k": args.k,
            "rerank_k": args.rerank_k,
            "batch_max_size": args.batch_max_size,
            "batch_max_wait_ms": args.batch_max_wait_ms,
            "threads": args.threads,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": levels,
        },
        "setup_s": round(setup_s, 1),
        "notes": "latency is end to end over loopback HTTP (httpx asyncio clients in the bench process, the server "
        "in its own process); 'batching=false' is ALBEF_BATCH_MAX_SIZE=1 (one query per model call, "
        "still off the event loop); errors counts non-200 answers by status (503 = queue full)",
        "runs": runs,
    }
    from albef.index import IndexReader

    with IndexReader.open(index) as reader:
        report["index"] = {
            "images": reader.count("image"),
            "texts": reader.count("text"),
            "factory": {k: (reader.manifest["ann"].get(k) or {}).get("factory") for k in ("image", "text")},
        }
    write_result(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
