"""This machine's matrix-multiply peaks: torch fp32/bf16/fp16 GEMM, ONNX Runtime's fp32 and int8 GEMM.

torch bf16/fp16 are probed first (albef.model.precision) and skipped, with the reason, on a CPU without
native kernels for them. The JSON records the CPU model and flags (bench/common.py).

The figures are the ceiling each inference path is compared against in bench_export.py.

    python bench/gemm.py [--n 4096] [--threads 2] [--out bench/results/gemm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402


def _median_time(fn: Any, reps: int, budget_s: float, warm: bool = False) -> float:
    if not warm:
        fn()  # warm-up (allocations, kernel selection)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_gemm_gflops(
    dtype: str = "float32", n: int = 4096, threads: int = 2, reps: int = 5, budget_s: float = 20.0
) -> float:
    """GFLOP/s of an n x n x n matmul in torch (2 n^3 FLOP)."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    with torch.inference_mode():
        t = _median_time(lambda: torch.mm(a, b), reps, budget_s)
    return 2.0 * n**3 / t / 1e9


class OrtGemmProbe:
    """An n^3 MatMul in ONNX Runtime, fp32 or dynamically quantised as the int8 variant is (7-bit weights),
    built once and timed call by call. ``spinning`` as the session's ``allow_spinning`` (the runtime's
    sessions do not spin; a probe in the same process as them should not either, or its idle thread would
    take a core from the next measurement)."""

    def __init__(self, n: int, threads: int, int8: bool, spinning: bool = True) -> None:
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from albef.model.runtime import session_options

        rng = np.random.default_rng(0)
        w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])],
            "gemm",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(w, "W")],
        )
        self.n = n
        self.x = rng.standard_normal((n, n)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
            if int8:
                quantize_dynamic(
                    str(path), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8, reduce_range=True
                )
                path = Path(tmp) / "q.onnx"
            so = session_options(threads, spinning=spinning)
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.run()  # warm-up (allocations, kernel selection)

    def run(self) -> None:
        self.sess.run(None, {"X": self.x})

    def rate(self) -> float:
        """Operations/s / 1e9 of one call."""
        t0 = time.perf_counter()
        self.run()
        return 2.0 * self.n**3 / (time.perf_counter() - t0) / 1e9


def _ort_gemm_rate(n: int, threads: int, reps: int, budget_s: float, int8: bool) -> float:
    """Operations/s / 1e9 of an n^3 MatMul in ONNX Runtime (:class:`OrtGemmProbe`), median of ``reps``."""
    probe = OrtGemmProbe(n, threads, int8)
    return 2.0 * n**3 / _median_time(probe.run, reps, budget_s, warm=True) / 1e9


def ort_int8_gemm_gops(n: int = 4096, threads: int = 2, reps: int = 5, budget_s: float = 20.0) -> float:
    """GOP/s of ONNX Runtime's dynamically quantised int8 MatMul (the int8 variant's kernel), n^3."""
    return _ort_gemm_rate(n, threads, reps, budget_s, int8=True)


def ort_fp32_gemm_gflops(n: int = 4096, threads: int = 2, reps: int = 5, budget_s: float = 20.0) -> float:
    """GFLOP/s of ONNX Runtime's fp32 MatMul (the fp32 variant's kernel), n^3."""
    return _ort_gemm_rate(n, threads, reps, budget_s, int8=False)


def torch_peaks(
    n: int, threads: int, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
) -> dict[str, Any]:
    """torch GEMM GFLOP/s per dtype; a dtype whose short probe shows no native kernel on this CPU is skipped
    (about 100x slower than fp32 there: the full-size GEMM would take minutes), with the reason."""
    import torch

    from albef.model.precision import probe_dtype

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    for dt in dtypes:
        probe = probe_dtype(dt)
        key = f"torch_{'bf16' if dt == 'bfloat16' else 'fp16' if dt == 'float16' else 'fp32'}_gflops"
        out[key] = round(torch_gemm_gflops(dt, n, threads), 1) if probe["native"] else None
        out.setdefault("probes", {})[dt] = probe
        if not probe["native"]:
            out.setdefault("skipped", {})[key] = probe["reason"]
    return out


def measure(n: int = 4096, threads: int = 2) -> dict[str, Any]:
    return {
        "n": n,
        "threads": threads,
        **torch_peaks(n, threads),
        "ort_fp32_gflops": round(ort_fp32_gemm_gflops(n, threads), 1),
        "ort_int8_gops": round(ort_int8_gemm_gops(n, threads), 1),
        "loadavg_1m_before_write": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/gemm.json"))
    args = ap.parse_args()
    res = measure(args.n, args.threads)
    write_result(args.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
