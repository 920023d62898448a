"""Experiment (session 24): which int8 MatMuls move the shipped model's outputs?

Exports ``model/weights/albef-tiny-synth`` fp32 once, then writes int8 variants that keep chosen weight
products in float32 (``nodes_to_exclude`` of ONNX Runtime's dynamic quantisation), and measures each against
fp32: the export's validation figures (random inputs, as every export checks) and the re-ranking top-1
agreement on a synthetic test split (near and strict, as in the bounds).

    python scripts/experiments/int8_sensitivity.py --seed 11 --images 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from albef.model.data.annotations import load_eval_set
from albef.model.data.synth import generate
from albef.model.export import export_bundle, rerank_agreement, runtime_score_matrices, write_manifest
from albef.model.export_validate import torch_reference, validate
from albef.model.factory import create_model
from albef.model.quantize import ENCODER_ROLES
from albef.model.runtime import Bundle

CKPT = Path("model/weights/albef-tiny-synth")


def weight_class(node: str, activation: str) -> str:
    """A weight product's part of the transformer, from its node name and its activation input's name (the
    names torch's exporter gives; approximate): ``head`` (embedding projections, ITM head), ``ffn_down``
    (fed by GELU), ``attn_out`` (fed by the heads' merge), ``other`` (Q/K/V, FFN up)."""
    if any(h in node for h in ("vision_proj", "text_proj", "itm_head")):
        return "head"
    if "Mul_1_output" in activation:
        return "ffn_down"
    if "Reshape" in activation or "bilinear" in activation:
        return "attn_out"
    return "other"


def weight_nodes(path: Path) -> dict[str, str]:
    """Node name -> class of every MatMul/Gemm with a weight in one graph."""
    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    return {
        n.name: weight_class(n.name, n.input[0])
        for n in g.node
        if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)
    }


def quantize(
    root: Path, files: dict[str, str], tag: str, keep: Callable[[str, str], bool], per_channel: bool = False
) -> dict[str, str]:
    """int8 files of every role, keeping in fp32 the nodes where ``keep(role, class)``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = {}
    for role, name in files.items():
        classes = weight_nodes(root / name)
        # ORT rewrites a Gemm as MatMul + Add named "<gemm>_MatMul" before it quantises
        exclude = [x for n, c in classes.items() if keep(role, c) for x in (n, n + "_MatMul")]
        qname = f"{role}.{tag}.onnx"
        quantize_dynamic(
            str(root / name),
            str(root / qname),
            weight_type=QuantType.QInt8,
            reduce_range=True,
            per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=exclude,
        )
        out[role] = qname
    return out


def _encoders_and(kind: str) -> Callable[[str, str], bool]:
    return lambda r, c: r in ENCODER_ROLES or c == kind


RULES: dict[str, Callable[[str, str], bool]] = {
    "all_int8": lambda r, c: False,
    "fp32_image_encoder": lambda r, c: r == "image_encoder",
    "fp32_text_encoder": lambda r, c: r == "text_encoder",
    "fp32_itm_graphs": lambda r, c: r in ("itm", "itm_short", "itm_kv", "image_kv"),
    "fp32_heads": lambda r, c: c == "head",
    "fp32_ffn_down": lambda r, c: c == "ffn_down",
    "fp32_attn_out": lambda r, c: c == "attn_out",
    "fp32_heads_ffn_down": lambda r, c: c in ("head", "ffn_down"),
    "fp32_encoders": lambda r, c: r in ENCODER_ROLES,
    "fp32_text_encoder_image_ffn_down": lambda r, c: (
        r == "text_encoder" or (r == "image_encoder" and c == "ffn_down")
    ),
    "fp32_text_encoder_image_attn_out": lambda r, c: (
        r == "text_encoder" or (r == "image_encoder" and c == "attn_out")
    ),
    "fp32_text_encoder_image_other": lambda r, c: (
        r == "text_encoder" or (r == "image_encoder" and c == "other")
    ),
    "fp32_text_encoder_image_head": lambda r, c: (
        r == "text_encoder" or (r == "image_encoder" and c == "head")
    ),
    **{f"fp32_encoders_itm_{k}": _encoders_and(k) for k in ("head", "ffn_down", "attn_out", "other")},
    "fp32_text_encoder_ffn_down": lambda r, c: r == "text_encoder" and c == "ffn_down",
    "fp32_text_encoder_attn_out": lambda r, c: r == "text_encoder" and c == "attn_out",
    "fp32_text_encoder_other": lambda r, c: r == "text_encoder" and c == "other",
    "fp32_text_encoder_head": lambda r, c: r == "text_encoder" and c == "head",
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="albef-int8-sens-") as tmp:
        root = Path(tmp)
        model = create_model(None, CKPT)
        manifest = export_bundle(model, root / "b", variants=["fp32"], checkpoint=CKPT, progress=False)
        ref = torch_reference(model)
        generate(root / "split", args.images, seed=args.seed, size=128, progress=False)
        es = load_eval_set(root / "split" / "test.json")
        files32 = manifest["variants"]["fp32"]["files"]
        b = Bundle.load(root / "b", variant="fp32", intra_op_threads=2)
        _, i2t, t2i = runtime_score_matrices(b, es.images, es.texts, args.k)
        base = {"i2t": i2t, "t2i": t2i}
        counts: dict[str, int] = {}
        for name in files32.values():
            for c in weight_nodes(root / "b" / name).values():
                counts[c] = counts.get(c, 0) + 1
        print(json.dumps({"weight_classes": counts, "images": len(es.images), "texts": len(es.texts)}))  # noqa: T201
        for tag in args.rules.split(","):
            t0 = time.perf_counter()
            files = quantize(root / "b", files32, tag, RULES[tag], args.per_channel)
            m = json.loads((root / "b" / "manifest.json").read_text())
            m["variants"][tag] = {"files": files}
            m.pop("files", None)
            m.pop("bundle_id", None)
            write_manifest(root / "b", m)
            fig = validate(ref, root / "b", tag)
            b = Bundle.load(root / "b", variant=tag, intra_op_threads=2)
            _, i2t, t2i = runtime_score_matrices(b, es.images, es.texts, args.k)
            agree = rerank_agreement(base, {"i2t": i2t, "t2i": t2i})
            for d, o in (("t2i", t2i), ("i2t", i2t)):  # ITM logits of the pairs both shortlists hold
                both = (base[d] > -100) & (o > -100)
                agree[f"itm_diff_on_data_{d}"] = round(float(abs(base[d][both] - o[both]).max()), 4)
            keys = ("image_emb_min_cos", "text_emb_min_cos", "itm_logits")
            row = {"rule": tag, **{k: fig[k] for k in keys}, **agree, "s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
