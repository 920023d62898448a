"""What a served query costs beyond its compute: the server-side total of a re-ranked text->image search against
the model calls it needs (its text encode and its ITM pairs). Writes ``bench/results/overhead.json``.

One client sends the queries one at a time to a real ``albef serve`` on 127.0.0.1 (the albef-tiny
configuration at 96 px, random weights, an index of ``--images`` synthetic images, re-ranking ``--rerank-k``
candidates). Each answer's ``timings_ms`` is the server's own clock (HTTP parsing and JSON are outside it):
``total`` and, of it, ``model``, the model calls of that very request. Two ratios per round:

- ``ratio_in_situ`` = median ``total`` / median ``model``: what the service adds around the model calls
  (tokenizing, hops between threads, the ANN search, gathers, casts, assembling the answer);
- ``ratio_to_hot_loop`` = median ``total`` / the median of the same calls in a hot loop: after the served
  block, while the server idles, this process times each query's ``encode_ids`` and ``itm_scores`` on the same
  bundle and index with the same thread count (features gathered and cast to float32 in between, untimed).
  Served and hot-loop calls run in blocks, not query by query: interleaving them would make each run on
  caches the other just filled with its own copy of the model (measured: both about half slower). The
  gap between ``model`` and the hot loop is how much slower the same calls run in a served request, where
  HTTP work between queries has taken the caches.

    python bench/bench_overhead.py            # about two minutes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from bench_service import Server, load_queries, make_bundle, make_index  # noqa: E402
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("encode", "ann", "rerank", "total", "model")


class Raw:
    """The same bundle and index in this process: a query's encode and ITM call times (ms), as the server
    makes them, without the service around them."""

    def __init__(self, bundle_dir: Path, index: Path, rerank_k: int, threads: int | None) -> None:
        from albef.index.reader import IndexReader
        from albef.model.runtime import Bundle

        self.bundle = Bundle.load(bundle_dir, intra_op_threads=threads)  # as ALBEF_THREADS does
        self.reader = IndexReader.open(index)
        self.rerank_k = rerank_k

    def __call__(self, text: str) -> dict[str, float]:
        from albef.service.engine import clean_query_text

        ids, mask = self.bundle.tokenizer([clean_query_text(text)], clean=False)
        t0 = time.perf_counter()
        emb, tok = self.bundle.encode_ids(ids, mask)
        t1 = time.perf_counter()
        _, found = self.reader.search("image", emb, self.rerank_k)
        images = self.reader.image_tokens([int(x) for x in found[0] if x >= 0])  # float32: the graph alone
        t2 = time.perf_counter()
        self.bundle.itm_scores(tok, mask, images)
        t3 = time.perf_counter()
        return {
            "encode": (t1 - t0) * 1e3,
            "itm": (t3 - t2) * 1e3,
            "encode_plus_itm": (t1 - t0 + t3 - t2) * 1e3,
        }

    def close(self) -> None:
        self.reader.close()


def served(url: str, texts: list[str], k: int, rerank_k: int, warmup: int) -> list[dict[str, float]]:
    """Each query's server timings, one query at a time over one keep-alive connection."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    out: list[dict[str, float]] = []
    with httpx.Client(base_url=url, timeout=60, transport=transport) as client:
        for i, text in enumerate(texts[:warmup] + texts):
            r = client.post("/v1/search/images", json={"text": text, "k": k, "rerank_k": rerank_k})
            r.raise_for_status()
            if i >= warmup:
                out.append(r.json()["timings_ms"])
    return out


def median(values: list[float]) -> float:
    return round(float(np.median(values)), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=360, help="images of the synthetic index (default 360)")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=6, help="served-then-raw blocks (default 6)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="ALBEF_THREADS (default: ONNX Runtime's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    bundle = make_bundle(work, None)
    index = make_index(work, bundle, args.images)
    texts, _ = load_queries(index, args.queries)
    env = {"ALBEF_RELOAD_INTERVAL_S": "0", "ALBEF_MAX_RERANK_K": str(max(256, args.rerank_k))}
    if args.threads:
        env["ALBEF_THREADS"] = str(args.threads)

    rounds: list[dict[str, Any]] = []
    raw = Raw(bundle, index, args.rerank_k, args.threads)
    server = Server(index, bundle, env)
    try:
        for r in range(args.rounds):
            load_before = [round(x, 2) for x in os.getloadavg()]
            srv = served(server.url, texts, args.k, args.rerank_k, args.warmup)
            compute = [raw(t) for t in texts[: args.warmup] + texts][args.warmup :]  # the server idles
            total = median([x["total"] for x in srv])
            row = {
                "round": r,
                "served_ms_median": {key: median([x.get(key, 0.0) for x in srv]) for key in STAGES},
                "raw_ms_median": {key: median([x[key] for x in compute]) for key in compute[0]},
                # the same request's model calls (timings_ms.model): what the service adds around them
                # (servers before timings_ms.model had no such figure: None)
                "ratio_in_situ": round(total / in_situ, 2)
                if (in_situ := median([x.get("model", 0.0) for x in srv]))
                else None,
                "ratio_in_situ_per_query_median": median([x["total"] / x["model"] for x in srv])
                if in_situ
                else None,
                # a hot loop of the same calls in another process: also how much slower they run when served
                "ratio_to_hot_loop": round(total / median([x["encode_plus_itm"] for x in compute]), 2),
                "load_before": load_before,
                "load_after": [round(x, 2) for x in os.getloadavg()],
            }
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
        raw.close()

    manifest = json.loads((bundle / "manifest.json").read_text())
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": "albef-tiny", "bundle_id": manifest["bundle_id"], "weights": "random"},
        "setup": {"images": args.images, "queries": args.queries, "k": args.k, "rerank_k": args.rerank_k},
        "notes": "served: timings_ms of the server (one client, sequential queries); raw: the same bundle's "
        "encode_ids and itm_scores calls in this process after the round's served block, the server idle; "
        "medians per round",
        "rounds": rounds,
        "ratio_in_situ_median": median([x["ratio_in_situ"] for x in rounds])
        if rounds[0]["ratio_in_situ"]
        else None,
        "ratio_to_hot_loop_median": round(float(np.median([x["ratio_to_hot_loop"] for x in rounds])), 2),
    }
    write_result(args.out, report)
    print(
        f"total / model calls (median of rounds): {report['ratio_in_situ_median']} in situ, "
        f"{report['ratio_to_hot_loop_median']} against a hot loop"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
