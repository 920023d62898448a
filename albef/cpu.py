"""What CPU this is: model name, the instruction-set flags our kernels depend on, and what follows.

Torch-free and import-light: the service logs it at start, export records it in the manifest, and every
benchmark writes it into its JSON. Read from ``/proc/cpuinfo`` (Linux); elsewhere the fields are empty.

Why the flags matter (details in docs/cpu.md):
- ``avx512_vnni`` / ``avx_vnni`` / ``amx_int8``: ONNX Runtime's u8 x s8 int8 GEMM accumulates straight into
  32 bits. Without them (AVX2 only) it multiplies pairs into a saturating 16-bit sum, which the int8 variant's
  7-bit weight range is chosen to keep exact.
- ``avx512_bf16`` / ``amx_bf16``: native bf16 dot products. Without them torch's bf16 GEMM falls back to a
  scalar path about 100x slower than fp32.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["RELEVANT_FLAGS", "cpu_info", "has_flag", "int8_kernel"]

# The flags any of our choices or figures depend on, in the order they are reported.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
_BF16 = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    try:
        text = Path(path).read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model or platform.machine(), flags


def has_flag(name: str) -> bool:
    return name in _read_cpuinfo()[1]


def int8_kernel() -> str:
    """Which kind of int8 dot product ONNX Runtime's CPU GEMM uses here (by the flags it dispatches on)."""
    flags = _read_cpuinfo()[1]
    if any(f in flags for f in _VNNI):
        return "vnni"  # u8 x s8 -> int32 directly
    if "avx2" in flags:
        return "avx2"  # u8 x s8 pairs summed in 16 bits with saturation, then widened
    return "other"


def cpu_info() -> dict[str, Any]:
    """The CPU model, the relevant flags present, and what they imply for int8 and bf16."""
    model, flags = _read_cpuinfo()
    return {
        "model": model,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "flags": [f for f in RELEVANT_FLAGS if f in flags],
        "int8_kernel": int8_kernel(),
        "native_bf16": any(f in flags for f in _BF16),
    }
