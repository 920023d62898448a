"""The int8 variant: how it is quantised, the bounds it must meet, and the checks that hold it to them.

Scheme (chosen by measurement on both CPU classes we run on, see docs/cpu.md): ONNX Runtime dynamic
quantisation of every MatMul/Gemm weight to int8, symmetric, with ``reduce_range`` (weights in [-64, 64]);
activations are quantised to uint8 on the fly. Why the 7-bit range: without VNNI, ONNX Runtime's u8 x s8
GEMM multiplies adjacent pairs and adds them in a saturating 16-bit register (``vpmaddubsw``). With 8-bit
weights a pair can reach 2 x 255 x 127 = 64770 > 32767 and is clipped, which on an AVX2-only EPYC cost the
text embeddings a cosine of 0.97 with fp32. With |w| <= 64 a pair is at most 2 x 255 x 64 = 32640, so the
integer arithmetic is exact on every x86 kernel (VNNI, AVX2, AMX) and the variant is the same model on
every CPU. u8 x u8 would be exact too but runs at half the speed of u8 x s8 on VNNI (measured).

Scope: ``all`` quantises every graph; ``rerank`` only the re-ranking graphs (ITM and the image's K/V), so the
variant's encoders are fp32's own files: its features, ITC shortlists and indexes are fp32's, and int8 speeds
up the query's re-ranking step. Measured on the shipped model: int8 encoders are where the variant's ranking
departs from fp32 (the ITM graphs alone agree on >= 99% of top-1s), see docs/cpu.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from albef.model.runtime import variant_file

__all__ = [
    "ENCODER_ROLES",
    "INT8_BOUNDS",
    "INT8_SCOPES",
    "Int8Bounds",
    "bounds_dict",
    "check_int8",
    "check_scope",
    "int8_scheme",
    "max_int8_weight",
    "quantize_int8",
]

# The largest |weight| the saturation-free argument allows: 2 * 255 * W_MAX <= 32767.
W_MAX = 64
INT8_SCOPES = ("all", "rerank")
ENCODER_ROLES = ("image_encoder", "text_encoder")


def check_scope(scope: str) -> str:
    """``scope`` if it is one of :data:`INT8_SCOPES`; a ValueError naming the choices otherwise."""
    if scope not in INT8_SCOPES:
        raise ValueError(f"int8 scope {scope!r}: choose from {', '.join(INT8_SCOPES)}")
    return scope


def int8_scheme(per_channel: bool = False, scope: str = "all") -> str:
    """The manifest's description of the int8 weights."""
    granularity = "per output channel" if per_channel else "per tensor"
    graphs = "every graph" if scope == "all" else "the re-ranking graphs (the encoders are fp32's)"
    return (
        f"int8 symmetric {granularity}, 7-bit range (reduce_range: weights in [-64, 64], so no u8 x s8 pair "
        f"sum can saturate a 16-bit register on CPUs without VNNI), MatMul/Gemm weights of {graphs}; "
        "activations quantised to uint8 dynamically (onnxruntime.quantization.quantize_dynamic)"
    )


@dataclass(frozen=True)
class Int8Bounds:
    """What the int8 variant must meet against fp32, on every CPU (no per-CPU thresholds).

    The cosines and the weight range are checked by every export on its validation inputs (random pixels
    and token ids). The re-ranking agreement is a property of a trained model on data, checked when the
    export evaluates on an eval split. The ITM logit difference on the random inputs stands in for it when
    there is no eval split; with one, the agreement decides and the logit figure is recorded only: a trained
    model with sharp logits moves them by 0.2-0.4 under int8 (the shipped one, on random inputs and on
    unseen scenes) and still keeps >= 99% of its top-1s, while a broken int8 kernel changes rankings."""

    min_embedding_cos: float = 0.995  # per image and per text embedding (measured: >= 0.9988 on both CPUs)
    max_itm_logit_diff: float = 0.05  # largest |int8 - fp32| ITM logit, without an eval split
    max_int8_weight: int = W_MAX  # the saturation-free range above
    # same top-1 after ITM re-ranking (or one fp32 scores within max_itm_logit_diff of it), per direction
    min_rerank_top1_agreement: float = 0.99


INT8_BOUNDS = Int8Bounds()


def quantize_int8(
    out: Path, files: Mapping[str, str], per_channel: bool = False, scope: str = "all"
) -> dict[str, str]:
    """Write the int8 graph of the fp32 graphs in ``out`` (``files``: role -> fp32 file name) that ``scope``
    covers; returns the variant's role -> file name (fp32's own file for a role left out). ``per_channel``
    scales each output channel (ORT loops over channels in Python, about 10x slower to export)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    check_scope(scope)
    q = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        for role, name in files.items():
            if scope == "rerank" and role in ENCODER_ROLES:
                q[role] = name
                continue
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
    """The bounds ``figures`` (from validation, and the agreement when measured) miss, one line each; empty
    when the variant is fit to ship. With the agreement measured, the ITM logit figure is not a bound."""
    bad = []
    for key in ("image_emb_min_cos", "text_emb_min_cos"):
        if key in figures and figures[key] < bounds.min_embedding_cos:
            bad.append(f"{key} {figures[key]:.4f} < {bounds.min_embedding_cos}")
    measured = all(f"rerank_top1_agreement_{d}" in figures for d in ("t2i", "i2t"))
    if not measured and figures.get("itm_logits", 0.0) > bounds.max_itm_logit_diff:
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
