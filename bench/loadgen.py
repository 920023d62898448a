"""A closed-loop HTTP load generator for the search service, meant to run as its own process.

``concurrency`` clients (asyncio tasks, each with its own keep-alive HTTP/1.1 connection, :class:`Connection`)
each send a request, wait for the answer, and send the next, until ``requests`` have been sent or
``duration`` seconds have passed, whichever comes first. Queries are text->image searches of synthetic-style
captions (seeded), optionally mixed with image->text uploads of small generated images. The summary (JSON, to stdout or ``--out``) counts answers by
status, transport errors, 503s without ``Retry-After``, latency percentiles of the 200s and the 503s, and
those of the server's own ``timings_ms.total`` of the 200s (what the server spent, without this process's lag).

    python bench/loadgen.py --url http://127.0.0.1:8000 --concurrency 16 --duration 10 --requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large", "")
RELATIONS = ("above", "below", "left of", "right of")


def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}".replace("  ", " ")
        b = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        out.append(f"{a} {rng.choice(RELATIONS)} {b}")
    return out


def small_pngs(n: int, seed: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(40), rng.randrange(40)
        ImageDraw.Draw(img).ellipse((x, y, x + 20, y + 20), fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return round(s[i], 3)


class HttpError(Exception):
    """A transport failure of one request (connection refused, reset or closed mid-answer, timeout)."""


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, on asyncio streams.

    Why not httpx here: in one process of 128 clients its client code took ~4 ms of CPU per request and made
    this process, not the server, the bottleneck on a 2-core machine; writing prepared request bytes and
    reading each answer by its Content-Length costs a small fraction of that. Answers are what uvicorn sends
    (status line, headers, a Content-Length body); a chunked or close-delimited one is read too."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            return await asyncio.wait_for(self._request(raw), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as exc:
            await self.close()
            raise HttpError(type(exc).__name__) from exc

    async def _request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size + 2))
            await self.reader.readuntil(b"\r\n")
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def prepared_requests(
    url: str, texts: list[str], images: list[bytes], k: int, rerank_k: int, api_key: str | None
) -> tuple[str, int, list[bytes], list[bytes]]:
    """(host, port, text->image requests, image->text upload requests) as the bytes sent."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    extra = f"X-API-Key: {api_key}\r\n" if api_key else ""

    def raw(path: str, ctype: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode() + body

    t2i = [
        raw(
            "/v1/search/images",
            "application/json",
            json.dumps({"text": t, "k": k, "rerank_k": rerank_k}).encode(),
        )
        for t in texts
    ]
    boundary = "loadgen-boundary-7f3a"

    def form(png: bytes) -> bytes:
        fields = "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'
            for n, v in (("k", k), ("rerank_k", rerank_k))
        )
        file_head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        return fields.encode() + file_head.encode() + png + f"\r\n--{boundary}--\r\n".encode()

    i2t = [raw("/v1/search/texts", f"multipart/form-data; boundary={boundary}", form(png)) for png in images]
    return host, port, t2i, i2t


async def run_load(
    url: str,
    *,
    concurrency: int,
    requests: int,
    duration: float,
    k: int = 10,
    rerank_k: int = 32,
    image_share: float = 0.0,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    texts = captions(64, seed)
    images = small_pngs(8, seed) if image_share > 0 else []
    host, port, t2i, i2t = prepared_requests(url, texts, images, k, rerank_k, api_key)
    status: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    lat_ok: list[float] = []
    server_ok: list[float] = []  # the server's own timings_ms.total of each 200
    lat_503: list[float] = []
    missing_retry_after = 0
    transport: Counter[str] = Counter()
    sent = 0
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def client_loop(cid: int) -> None:
        nonlocal sent, missing_retry_after
        rng = random.Random(seed * 1000 + cid)
        conn = Connection(host, port, timeout)
        try:
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                raw = rng.choice(i2t) if i2t and rng.random() < image_share else rng.choice(t2i)
                t0 = time.perf_counter()
                try:
                    code, headers, body = await conn.request(raw)
                except HttpError as exc:
                    transport[str(exc)] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000.0
                status[str(code)] += 1
                if code == 200:
                    lat_ok.append(ms)
                    server_ok.append(float(json.loads(body)["timings_ms"]["total"]))
                    continue
                try:
                    codes[json.loads(body)["error"]["code"]] += 1
                except (ValueError, KeyError, TypeError):
                    codes["<not the error shape>"] += 1
                if code == 503:
                    lat_503.append(ms)
                    if "retry-after" not in headers:
                        missing_retry_after += 1
        finally:
            await conn.close()

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    n_ok = status.get("200", 0)
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 3),
        "requests": sent,
        "by_status": dict(sorted(status.items())),
        "error_codes": dict(sorted(codes.items())),
        "transport_errors": dict(transport),
        "server_errors_other_than_503": sum(v for s, v in status.items() if s.startswith("5") and s != "503"),
        "missing_retry_after": missing_retry_after,
        "throughput_ok_rps": round(n_ok / elapsed, 2) if elapsed > 0 else None,
        "latency_ms": {
            "p50": percentile(lat_ok, 50),
            "p90": percentile(lat_ok, 90),
            "p99": percentile(lat_ok, 99),
            "max": round(max(lat_ok), 3) if lat_ok else None,
        },
        "server_total_ms": {"p50": percentile(server_ok, 50), "p99": percentile(server_ok, 99)},
        "latency_503_ms": {"p50": percentile(lat_503, 50), "p99": percentile(lat_503, 99)},
        "k": k,
        "rerank_k": rerank_k,
        "image_share": image_share,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=1000, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=10.0, help="stop after this many seconds")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--image-share", type=float, default=0.0, help="share of image->text uploads (0..1)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON summary here (default: stdout)")
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.requests < 1 or a.duration <= 0:
        p.error("--concurrency and --requests must be >= 1, --duration > 0")
    summary = asyncio.run(
        run_load(
            a.url,
            concurrency=a.concurrency,
            requests=a.requests,
            duration=a.duration,
            k=a.k,
            rerank_k=a.rerank_k,
            image_share=a.image_share,
            api_key=a.api_key,
            seed=a.seed,
        )
    )
    text = json.dumps(summary, indent=2)
    if a.out:
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(a.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
