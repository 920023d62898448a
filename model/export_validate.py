"""Validation of an export: PyTorch and ONNX Runtime on the same inputs, before anything is published.

The fp32 graphs must match PyTorch within ``FP32_TOLERANCE``; the figures of the other variants are held
to their own bounds (:mod:`albef.model.quantize`). :func:`rerank_agreement` compares two variants' ranked
results on an eval split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from albef.model.albef import ALBEF
from albef.model.export_adapters import example_inputs
from albef.model.export_defaults import FP32_TOLERANCE
from albef.model.quantize import INT8_BOUNDS

__all__ = ["ExportError", "FP32_TOLERANCE", "torch_reference", "validate", "check_fp32", "rerank_agreement"]


class ExportError(RuntimeError):
    """The export could not be validated or written; nothing was published."""


def _maxdiff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(cos.min())


def torch_reference(model: ALBEF, seed: int = 1) -> dict[str, Any]:
    """PyTorch outputs on the validation inputs, computed once and shared by every variant's validation.

    Inputs: 3 images; 3 texts of ragged lengths at full length, at a shorter padded length (the dynamic axis)
    and at full length with only a few real tokens (what the runtime trims, and for the tiny configurations
    what ``itm_short`` serves); ITM of the pairs, of one text against every image (the text->image re-rank)
    and of one image against every text (what the K/V-cached graph computes), all by the plain
    ``model.itm_logits``."""
    model.eval()
    ex = example_inputs(model, batch=3, seed=seed)
    cfg = model.config
    short = example_inputs(
        model, batch=3, length=max(4, cfg.max_tokens // 2), seed=seed + 1, encode_images=False
    )
    few = min(cfg.max_tokens, 8)
    padded = example_inputs(
        model, batch=3, seed=seed + 2, encode_images=False, lengths=[few, max(1, few - 3), 1]
    )
    ref: dict[str, Any] = {
        "pixels": ex["pixels"].numpy(),
        "image_emb": ex["image_emb"].numpy(),
        "image_tokens": ex["image_tokens"].numpy(),
        "texts": [],
    }
    img = ex["image_tokens"]
    with torch.no_grad():
        for inp in (ex, short, padded):
            tok, mask = inp["text_tokens"], inp["attention_mask"]
            n = tok.shape[0]
            ref["texts"].append(
                {
                    "ids": inp["input_ids"].numpy(),
                    "mask": mask.numpy(),
                    "text_emb": inp["text_emb"].numpy(),
                    "text_tokens": tok.numpy(),
                    "itm": model.itm_logits(tok, mask, img).numpy(),
                    "itm_one_text": model.itm_logits(
                        tok[:1].expand(img.shape[0], -1, -1), mask[:1].expand(img.shape[0], -1), img
                    ).numpy(),
                    "itm_one_image": model.itm_logits(tok, mask, img[:1].expand(n, -1, -1)).numpy(),
                }
            )
    return ref


def validate(ref: dict[str, Any], bundle_dir: Path, variant: str) -> dict[str, float]:
    """ONNX Runtime (through :class:`Bundle`) on the reference inputs: max abs differences to PyTorch,
    and the K/V-cached ITM graph against the plain one."""
    from albef.model.runtime import Bundle

    bundle = Bundle.load(bundle_dir, variant=variant)
    figures: dict[str, float] = {}
    o_img_emb, o_img_tok = bundle.encode_pixels(ref["pixels"])
    figures["image_emb"] = _maxdiff(ref["image_emb"], o_img_emb)
    figures["image_tokens"] = _maxdiff(ref["image_tokens"], o_img_tok)
    figures["image_emb_min_cos"] = _min_cos(ref["image_emb"], o_img_emb)
    text_diffs, tok_diffs, coss, itm_diffs, kv_diffs = [], [], [], [], []
    img1 = ref["image_tokens"][:1]
    for t in ref["texts"]:
        o_emb, o_tok = bundle.encode_ids(t["ids"], t["mask"])
        text_diffs.append(_maxdiff(t["text_emb"], o_emb))
        tok_diffs.append(_maxdiff(t["text_tokens"], o_tok))
        coss.append(_min_cos(t["text_emb"], o_emb))
        # ITM on PyTorch's token features, so the figure is the ITM graph's own error
        itm_diffs.append(
            _maxdiff(t["itm"], bundle.itm_scores(t["text_tokens"], t["mask"], ref["image_tokens"]))
        )
        one_text = bundle.itm_scores(t["text_tokens"][:1], t["mask"][:1], ref["image_tokens"])
        itm_diffs.append(_maxdiff(t["itm_one_text"], one_text))
        o_kv = bundle.itm_scores_for_image(img1, t["text_tokens"], t["mask"])
        itm_diffs.append(_maxdiff(t["itm_one_image"], o_kv))
        repeated = np.repeat(img1, len(t["mask"]), axis=0)
        kv_diffs.append(_maxdiff(o_kv, bundle.itm_scores(t["text_tokens"], t["mask"], repeated)))
    figures["text_emb"] = max(text_diffs)
    figures["text_tokens"] = max(tok_diffs)
    figures["text_emb_min_cos"] = min(coss)
    figures["itm_logits"] = max(itm_diffs)
    figures["itm_kv_vs_itm"] = max(kv_diffs)
    # differences to 3 significant digits; cosines to 6 decimals (rounding 0.9946 to 0.995 would hide a miss)
    return {k: round(v, 6) if k.endswith("_cos") else float(f"{v:.3g}") for k, v in figures.items()}


def check_fp32(figures: dict[str, float], tolerance: float = FP32_TOLERANCE) -> None:
    bad = {
        k: figures[k]
        for k in ("image_emb", "text_emb", "itm_logits", "itm_kv_vs_itm")
        if figures[k] > tolerance
    }
    if bad:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ExportError(f"ONNX Runtime differs from PyTorch by more than {tolerance:g}: {detail}")


def rerank_agreement(
    ref: dict[str, np.ndarray], other: dict[str, np.ndarray], tol: float = INT8_BOUNDS.max_itm_logit_diff
) -> dict[str, float]:
    """How often ``other``'s top-1 after ITM re-ranking is ``ref``'s, per direction (score matrices
    ``[queries, gallery]``, -100 outside the shortlist). ``strict``: the same item (argmax takes the lowest id
    among ties, as the ranking rule does). The bound uses the near form: the same item, or one that ``ref``
    scores within ``tol`` of its best, since a model whose logits tie cannot order those either."""
    out = {}
    for d in ("t2i", "i2t"):
        a, b = np.asarray(ref[d]), np.asarray(other[d])
        pick = b.argmax(1)
        out[f"rerank_top1_strict_agreement_{d}"] = round(float(np.mean(a.argmax(1) == pick)), 4)
        gap = a.max(1) - a[np.arange(len(a)), pick]
        out[f"rerank_top1_agreement_{d}"] = round(float(np.mean(gap <= tol)), 4)
    return out
