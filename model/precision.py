"""Which torch dtypes this CPU runs at native speed: a short measured probe, not an assumption.

On a CPU without bf16/fp16 dot-product instructions (an AVX2-only EPYC, for instance) torch's bf16 and fp16
GEMMs fall back to a path about 100x slower than fp32, so "use bf16 for speed" would be a 100x slowdown. The
probe times one small matmul in fp32 and in the dtype; a dtype is native when it reaches at least
``NATIVE_FRACTION`` of the fp32 rate (native kernels run at 1-3x fp32, fallbacks at about 1%).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from albef.cpu import cpu_info

__all__ = ["NATIVE_FRACTION", "UnsupportedDtypeError", "probe_dtype", "require_native"]

NATIVE_FRACTION = 0.25


class UnsupportedDtypeError(ValueError):
    """The requested dtype has no native kernel on this CPU (a setting the user can change, hence ValueError)."""


def _rate(dtype: torch.dtype, n: int, reps: int, budget_s: float) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up: kernel selection, allocations
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n**3 / times[len(times) // 2] / 1e9


def probe_dtype(
    dtype: str | torch.dtype, n: int = 384, reps: int = 3, budget_s: float = 2.0
) -> dict[str, Any]:
    """Time an ``n``^3 matmul in ``dtype`` and in fp32 on the CPU (well under a second where the dtype is
    native, at most a few seconds where it is not)."""
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    _rate(torch.float32, 64, 1, budget_s)  # wakes torch's thread pool, which the first call would pay for
    fp32 = _rate(torch.float32, n, reps, budget_s)
    rate = fp32 if dt == torch.float32 else _rate(dt, n, reps, budget_s)
    native = rate >= NATIVE_FRACTION * fp32
    out: dict[str, Any] = {
        "dtype": str(dt).removeprefix("torch."),
        "n": n,
        "gflops": round(rate, 1),
        "fp32_gflops": round(fp32, 1),
        "native": native,
    }
    if not native:
        info = cpu_info()
        out["reason"] = (
            f"no native {out['dtype']} matmul on this CPU ({info['model']}; flags: "
            f"{' '.join(info['flags']) or 'none'}): {rate:.1f} GFLOP/s against {fp32:.1f} in fp32"
        )
    return out


def require_native(dtype: str, what: str) -> dict[str, Any]:
    """Raise :class:`UnsupportedDtypeError` (naming ``what``, e.g. the setting) unless ``dtype`` is native."""
    probe = probe_dtype(dtype)
    if not probe["native"]:
        raise UnsupportedDtypeError(
            f"{what}: {probe['reason']}; it would run far slower than fp32, so it is refused (turn it off)"
        )
    return probe
