"""The int8 variant: how it is quantised, the bounds it must meet, and the checks that hold it to them.

Scheme (chosen by measurement on both CPU classes we run on, see docs/cpu.md): ONNX Runtime dynamic
quantisation of every MatMul/Gemm weight to int8, symmetric, with ``reduce_range`` (weights in [-64, 64]);
activations are quantised to uint8 on the fly. Why the 7-bit range: without VNNI, ONNX Runtime's u8 x s8
GEMM multiplies adjacent pairs and adds them in a saturating 16-bit register (``vpmaddubsw``). With 8-bit
weights a pair can reach 2 x 255 x 127 = 64770 > 32767 and is clipped, which on an AVX2-only EPYC cost the
text embeddings a cosine of 0.97 with fp32. With |w| <= 64 a pair is at most 2 x 255 x 64 = 32640, so the
integer arithmetic is exact on every x86 kernel (VNNI, AVX2, AMX) and the variant is the same model on
every CPU. u8 x u8 would be exact too but runs at half the speed of u8 x s8 on VNNI (measured).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from albef.model.runtime import variant_file

__all__ = [
    "INT8_BOUNDS",
    "Int8Bounds",
    "bounds_dict",
    "check_int8",
    "int8_scheme",
    "max_int8_weight",
    "quantize_int8",
]

# The largest |weight| the saturation-free argument allows: 2 * 255 * W_MAX <= 32767.
W_MAX = 64


def int8_scheme(per_channel: bool = False) -> str:
    """The manifest's description of the int8 weights."""
    granularity = "per output channel" if per_channel else "per tensor"
    return (
        f"int8 symmetric {granularity}, 7-bit range (reduce_range: weights in [-64, 64], so no u8 x s8 pair "
        "sum can saturate a 16-bit register on CPUs without VNNI), MatMul/Gemm weights only; activations "
        "quantised to uint8 dynamically (onnxruntime.quantization.quantize_dynamic)"
    )


@dataclass(frozen=True)
class Int8Bounds:
    """What the int8 variant must meet against fp32, on every CPU (no per-CPU thresholds).

    The first three are checked by every export on the export's validation inputs; the re-ranking agreement
    is a property of a trained model on data, checked when the export evaluates on an eval split (and by
    the tests on the shipped checkpoint and the synthetic split)."""

    min_embedding_cos: float = 0.995  # per image and per text embedding (measured: >= 0.9988 on both CPUs)
    max_itm_logit_diff: float = 0.05  # largest |int8 - fp32| ITM logit (measured: <= 0.021)
    max_int8_weight: int = W_MAX  # the saturation-free range above
    # same top-1 after ITM re-ranking (or one fp32 scores within max_itm_logit_diff of it), per direction;
    # measured for the shipped tiny model: 0.99 / 0.94 text->image / image->text on the demo's test split, 0.89
    # image->text on 160 unseen scenes (its ITM logits are nearly flat over near-paraphrase captions)
    min_rerank_top1_agreement: float = 0.85


INT8_BOUNDS = Int8Bounds()


def quantize_int8(out: Path, files: Mapping[str, str], per_channel: bool = False) -> dict[str, str]:
    """Write the int8 graph of every fp32 graph in ``out`` (``files``: role -> fp32 file name); returns role
    -> int8 file name. ``per_channel`` scales each output channel (ORT loops over channels in Python, about
    10x slower to export; measured a little more accurate)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        for role, name in files.items():
            qname = variant_file(role, "int8")
            tmp = out / (qname + ".part")
            quantize_dynamic(
                str(out / name),
                str(tmp),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=True,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
            tmp.replace(out / qname)
            q[role] = qname
    finally:
        root.setLevel(level)
    return q


def max_int8_weight(path: str | Path) -> int:
    """The largest |value| of the int8 weights in one graph (0 if it has none)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    biggest = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            biggest = max(biggest, int(np.abs(numpy_helper.to_array(init).astype(np.int32)).max(initial=0)))
    return biggest


def check_int8(figures: Mapping[str, float], bounds: Int8Bounds = INT8_BOUNDS) -> list[str]:
    """The bounds ``figures`` (from validation) miss, one line each; empty when the variant is fit to ship."""
    bad = []
    for key in ("image_emb_min_cos", "text_emb_min_cos"):
        if key in figures and figures[key] < bounds.min_embedding_cos:
            bad.append(f"{key} {figures[key]:.4f} < {bounds.min_embedding_cos}")
    if "itm_logits" in figures and figures["itm_logits"] > bounds.max_itm_logit_diff:
        bad.append(f"itm_logits deviation {figures['itm_logits']:.4f} > {bounds.max_itm_logit_diff}")
    if "max_int8_weight" in figures and figures["max_int8_weight"] > bounds.max_int8_weight:
        bad.append(
            f"int8 weights reach {figures['max_int8_weight']:.0f} > {bounds.max_int8_weight} (can saturate)"
        )
    for key in ("rerank_top1_agreement_t2i", "rerank_top1_agreement_i2t"):
        if key in figures and figures[key] < bounds.min_rerank_top1_agreement:
            bad.append(f"{key} {figures[key]:.3f} < {bounds.min_rerank_top1_agreement}")
    return bad


def bounds_dict(bounds: Int8Bounds = INT8_BOUNDS) -> dict[str, Any]:
    return asdict(bounds)
