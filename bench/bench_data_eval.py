"""Synthetic-data generation speed and evaluation re-ranking throughput (albef-tiny, random weights).

- ``albef data synth``: seconds and images/s for N images (default 3000, 128 px).
- ITM re-ranking of the official evaluation on that set's test split (first ``--eval-images`` images):
  ``score_matrices`` (distinct pairs once, image K/V reuse, CLS-only last layer) against the plain loop of
  the official code (``itm_logits`` per query, K/V recomputed per pair), both on the same short-lists.
Writes bench/results/data_eval.json (with the 1-minute load average: the CPU may be shared).

    python bench/bench_data_eval.py [--images 3000] [--eval-images 60] [--k-test 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--eval-images", type=int, default=60)
    ap.add_argument("--k-test", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "data_eval.json"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.synth import generate
    from albef.model.factory import create_model
    from albef.model.text import AlbefTokenizer, default_vocab_path
    from albef.model.train.evaluate import compute_features, score_matrices

    work = Path(tempfile.mkdtemp(prefix="bench-data-eval-"))
    try:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        counts = generate(work / "synth", args.images, seed=0, progress=False)
        synth_s = time.perf_counter() - t0

        torch.manual_seed(0)
        model = create_model("albef-tiny")
        tok = AlbefTokenizer.from_vocab(default_vocab_path())
        es = load_eval_set(work / "synth" / "test.json").subset(args.eval_images)
        t0 = time.perf_counter()
        feats = compute_features(model, es.images, es.texts, tok, progress=False)
        feat_s = time.perf_counter() - t0

        k = args.k_test
        t0 = time.perf_counter()
        sm = score_matrices(model, feats, k, progress=False)
        ours_s = time.perf_counter() - t0

        shortlisted = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            ki, kt = min(k, len(es.texts)), min(k, len(es.images))
            for i in range(len(es.images)):
                c = np.argsort(-sm.sims[i], kind="stable")[:ki]
                model.itm_logits(
                    feats["text_tokens"][c], feats["text_mask"][c], feats["image_tokens"][[i] * ki]
                )
                shortlisted += ki
            for t in range(len(es.texts)):
                c = np.argsort(-sm.sims[:, t], kind="stable")[:kt]
                model.itm_logits(
                    feats["text_tokens"][[t] * kt], feats["text_mask"][[t] * kt], feats["image_tokens"][c]
                )
                shortlisted += kt
        plain_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "command": "python bench/bench_data_eval.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "synth": {"images": args.images, "seconds": round(synth_s, 2), "images_per_s": round(args.images / synth_s, 1),
                  "counts": counts["images"]},
        "eval": {
            "config": "albef-tiny",
            "images": len(es.images),
            "texts": len(es.texts),
            "k_test": k,
            "features_s": round(feat_s, 2),
            "shortlisted_pairs": shortlisted,
            "score_matrices_s": round(ours_s, 2),
            "plain_official_loop_s": round(plain_s, 2),
            "speedup": round(plain_s / ours_s, 2),
            "shortlisted_pairs_per_s": round(shortlisted / ours_s, 1),
        },
    }  # fmt: skip
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
