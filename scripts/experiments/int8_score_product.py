"""Experiment (session 28): what would an integer score product save text->image int8 on the AVX2 EPYC?

In the bilinear cross-attention, the score product ``(Q W_k) X^T`` multiplies two activations, so dynamic
quantisation leaves it in float32; in text->image int8 those products are half a pair's FLOPs and bound how
much int8 gains over fp32 on a CPU whose int8 kernels are only ~1.9x fp32 (docs/cpu.md). This times one
fusion layer's score product at k = 32 with an 11-token text (``[32, 12 x 11, 768] x [32, 768, 577]``, random
values, 2 threads, spinning off, median of 15) in float32 (MatMul) and as u8 (dynamic, per tensor) x s8 (the
image tokens quantised once beforehand, per tensor) MatMulInteger, and prints the error against float32.

Measured on the AVX2-only EPYC (no VNNI), two runs at load 0.2: fp32 34.3 / 29.9 ms (109 / 125 GFLOP/s),
int8 19.6 / 14.6 ms (191 / 257 GOP/s, the activation's quantisation included), error 0.018 of the largest
score. About 15 ms per layer, ~75 ms of a 590 ms query: not built, because an error of that size on
attention scores needs the int8 agreement measured again.

    python scripts/experiments/int8_score_product.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import GraphProto
from onnx import TensorProto as T
from onnx import helper as h

from albef.model.runtime import session_options

B, M, K, N = 32, 132, 768, 577  # images, heads x text rows, image width, image tokens


def session(graph: GraphProto) -> ort.InferenceSession:
    so = session_options(2, 1)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    a = h.make_tensor_value_info("a", T.FLOAT, [B, M, K])
    y = h.make_tensor_value_info("y", T.FLOAT, [B, M, N])
    b32 = h.make_tensor_value_info("b", T.FLOAT, [B, K, N])
    fp32 = h.make_graph([h.make_node("MatMul", ["a", "b"], ["y"])], "fp32", [a, b32], [y])
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["a"], ["aq", "as", "az"]),
        h.make_node("MatMulInteger", ["aq", "bq", "az"], ["yi"]),
        h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT),
        h.make_node("Mul", ["as", "bs"], ["s"]),
        h.make_node("Mul", ["yf", "s"], ["y"]),
    ]
    bq = h.make_tensor_value_info("bq", T.INT8, [B, K, N])
    bs = h.make_tensor_value_info("bs", T.FLOAT, [])
    int8 = h.make_graph(nodes, "int8", [a, bq, bs], [y])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, M, K)).astype(np.float32)
    w = rng.standard_normal((B, K, N)).astype(np.float32)
    scale = np.array(np.abs(w).max() / 127, dtype=np.float32)
    ref = x @ w
    feeds = {
        "fp32": (session(fp32), {"a": x, "b": w}),
        "int8": (session(int8), {"a": x, "bq": np.round(w / scale).astype(np.int8), "bs": scale}),
    }
    for name, (s, feed) in feeds.items():
        s.run(None, feed)
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            out = s.run(None, feed)[0]
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        print(f"{name}: {1e3 * t:.1f} ms, {2 * B * M * K * N / t / 1e9:.0f} G/s, error {err:.4f}")  # noqa: T201


if __name__ == "__main__":
    main()
