"""Pick the demo page's example queries: held-out captions where ITM re-ranking visibly fixes the order.

The demo gallery is the test split of ``albef data synth --seed 31`` (``albef.demo.DEMO_SYNTH``; the shipped
model trains on seed 0). For every test caption that states a relation this scores the gallery's images as
the page does (the ITC shortlist of ``--rerank-k``, re-ranked by the ITM logit) and keeps the captions whose
ITC top image is false and whose re-ranked top image is true (by the generator's semantics), with more true
images in the re-ranked top ``--top`` than in ITC's. Prints them as JSON lines, the largest rise first::

    albef data synth /tmp/demo-gallery --images 3000 --seed 31
    python scripts/pick_demo_examples.py --data /tmp/demo-gallery --checkpoint model/weights/albef-tiny-synth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from albef.model.data.annotations import load_eval_set
from albef.model.data.scenes import parse_caption
from albef.model.data.truth import load_truth
from albef.model.factory import create_model
from albef.model.text import AlbefTokenizer, default_vocab_path
from albef.model.train.evaluate import compute_features, score_matrices


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="an `albef data synth` folder")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--n", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = create_model(None, args.checkpoint)
    tok = AlbefTokenizer.from_vocab(default_vocab_path())
    test = args.data / "test.json"
    eval_set = load_eval_set(test)
    truth = load_truth(test, eval_set.images, eval_set.texts)
    if truth is None:
        raise SystemExit(f"{args.data}: no scenes.json (not `albef data synth` data)")
    with torch.no_grad():
        feats = compute_features(model, eval_set.images, eval_set.texts, tok, progress=False)
        s = score_matrices(model, feats, args.rerank_k, progress=False)
    picked = []
    for t, text in enumerate(eval_set.texts):
        clauses = parse_caption(text)
        if not any(c.rel for c in clauses):
            continue  # a relation: what vector search gets wrong
        itc = np.argsort(-s.sims[:, t], kind="stable")
        itm = np.argsort(-s.t2i[t], kind="stable")
        true = truth.true[t]
        if true[itc[0]] or not true[itm[0]]:
            continue
        itc_true, itm_true = int(true[itc[: args.top]].sum()), int(true[itm[: args.top]].sum())
        if itm_true > itc_true:
            picked.append(
                {
                    "query": text,
                    "itc_top_true": itc_true,
                    "itm_top_true": itm_true,
                    "rise": itm_true - itc_true,
                }
            )
    picked.sort(key=lambda r: (-r["rise"], len(r["query"])))
    for r in picked[: args.n]:
        sys.stdout.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
