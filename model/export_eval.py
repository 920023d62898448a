"""Retrieval quality of a bundle variant: the official protocol, computed with the torch-free runtime.

:func:`make_evaluator` gives :func:`albef.model.export.export_bundle` the R@K figures it writes into the
manifest, and the score matrices from which the int8 re-ranking agreement is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from albef.model.ranking import rank

__all__ = ["Evaluator", "runtime_score_matrices", "make_evaluator"]

Evaluator = Callable[[Path, str], dict[str, Any]]


def runtime_score_matrices(
    bundle: Any, images: Sequence[Any], texts: Sequence[str], k_test: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """docs/model.md §4.3, with ONNX Runtime: ITC cosine, then the class-1 ITM logit on each query's top ``k_test``
    candidates (-100 elsewhere). Image->text uses the K/V-cached graph (the image side is computed once)."""
    img_emb, img_tok = bundle.encode_images(list(images), batch_size=batch_size)
    txt_emb, txt_tok, txt_mask = bundle.encode_texts(list(texts), batch_size=batch_size * 2)
    sims = img_emb @ txt_emb.T
    k_i2t = min(k_test, sims.shape[1])
    k_t2i = min(k_test, sims.shape[0])
    i2t = np.full(sims.shape, -100.0, dtype=np.float32)
    t2i = np.full(sims.T.shape, -100.0, dtype=np.float32)
    for i in range(sims.shape[0]):
        top = rank(sims[i], k=k_i2t)
        logits = bundle.itm_scores_for_image(img_tok[i : i + 1], txt_tok[top], txt_mask[top])
        i2t[i, top] = logits[:, 1]
    for j in range(sims.shape[1]):
        top = rank(sims[:, j], k=k_t2i)
        t = np.repeat(txt_tok[j : j + 1], len(top), axis=0)
        m = np.repeat(txt_mask[j : j + 1], len(top), axis=0)
        t2i[j, top] = bundle.itm_scores(t, m, img_tok[top])[:, 1]
    return sims, i2t, t2i


def make_evaluator(
    eval_json: str | Path, image_root: str | Path | None = None, k_test: int = 16
) -> Evaluator:
    """An evaluator for :func:`export_bundle`: R@K of ITC alone and of ITC+ITM re-ranking on an eval set
    (official val/test JSON), with ``albef.model.train.evaluate.itm_eval``."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.train.evaluate import itm_eval

    eval_set = load_eval_set(eval_json, image_root)

    def evaluate(bundle_dir: Path, variant: str) -> dict[str, Any]:
        from albef.model.runtime import Bundle

        bundle = Bundle.load(bundle_dir, variant=variant)
        t0 = time.perf_counter()
        sims, i2t, t2i = runtime_score_matrices(bundle, eval_set.images, eval_set.texts, k_test)
        seconds = time.perf_counter() - t0
        itc = itm_eval(sims, sims.T, eval_set.txt2img, eval_set.img2txt)
        itm = itm_eval(i2t, t2i, eval_set.txt2img, eval_set.img2txt)
        return {
            "data": str(eval_json),
            "images": len(eval_set.images),
            "texts": len(eval_set.texts),
            "k_test": k_test,
            "itc": {k: round(float(v), 3) for k, v in itc.items()},
            "itm": {k: round(float(v), 3) for k, v in itm.items()},
            "seconds": round(seconds, 2),
            "scores": {"i2t": i2t, "t2i": t2i},  # taken out by export_bundle for the int8 agreement figures
        }

    return evaluate
