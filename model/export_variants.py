"""The variants beside fp32, each a step on the manifest of a bundle being built.

``int8`` is quantised (:mod:`albef.model.quantize`) and validated on this machine; a variant that misses
its bounds is dropped with its figures kept under ``variants_not_shipped``. ``bf16`` is decided by a
measurement (:func:`probe_bf16`), not assumed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from albef.cpu import cpu_info
from albef.model.export_manifest import package_version, write_manifest
from albef.model.export_validate import rerank_agreement, validate
from albef.model.quantize import bounds_dict, check_int8, int8_scheme, max_int8_weight, quantize_int8

__all__ = ["probe_bf16", "add_int8", "decide_bf16", "add_int8_agreement", "drop_failed_int8"]

# The export's logger: these lines are part of what `albef export` reports.
log = logging.getLogger("albef.model.export")


def add_int8(
    tmp: Path,
    manifest: dict[str, Any],
    files32: dict[str, str],
    ref: dict[str, Any],
    per_channel: bool,
    scope: str = "all",
) -> None:
    """Quantise the fp32 graphs in ``tmp`` that ``scope`` covers and record the int8 variant with its
    validation figures."""
    files = quantize_int8(tmp, files32, per_channel, scope)
    manifest["variants"]["int8"] = {
        "files": files,
        "weights": int8_scheme(per_channel, scope),
        "scope": scope,
        "per_channel": per_channel,
        "reduce_range": True,
    }
    write_manifest(tmp, manifest)  # validation loads the bundle through the runtime
    figures = validate(ref, tmp, "int8")
    figures["max_int8_weight"] = max(
        (max_int8_weight(tmp / f) for f in set(files.values()) - set(files32.values())), default=0
    )
    manifest["variants"]["int8"]["validation"] = {
        **figures,
        "cpu": cpu_info(),
        "bounds": bounds_dict(),
        "failed": check_int8(figures),
    }


def add_int8_agreement(manifest: dict[str, Any], scores: dict[str, Any]) -> None:
    """With eval scores of fp32 and int8, the re-ranking agreement joins int8's figures and bounds."""
    if "int8" in manifest["variants"] and scores.get("int8") and scores.get("fp32"):
        val = manifest["variants"]["int8"]["validation"]
        val.update(rerank_agreement(scores["fp32"], scores["int8"]))
        val["failed"] = check_int8(val)


def drop_failed_int8(tmp: Path, manifest: dict[str, Any]) -> None:
    """An int8 variant that misses its bounds on this machine is not shipped; the manifest keeps the figures."""
    int8 = manifest["variants"].get("int8")
    if int8 is None or not int8["validation"]["failed"]:
        return
    fp32_files = set(manifest["variants"]["fp32"]["files"].values())
    for name in set(int8["files"].values()) - fp32_files:  # a rerank-scope variant shares fp32's encoders
        (tmp / name).unlink(missing_ok=True)
    del manifest["variants"]["int8"]
    alternative = "fp32 (shipped); see docs/cpu.md"
    if int8.get("scope", "all") == "all":
        alternative = "fp32 (shipped), or export with --int8-scope rerank (fp32 encoders); see docs/cpu.md"
    manifest["variants_not_shipped"]["int8"] = {
        "reason": "missed its accuracy bounds on this machine: " + "; ".join(int8["validation"]["failed"]),
        "validation": int8["validation"],
        "alternative": alternative,
    }
    log.warning(
        "int8 variant not shipped",
        extra={"failed": int8["validation"]["failed"], "cpu": int8["validation"]["cpu"]["model"]},
    )


def decide_bf16(manifest: dict[str, Any]) -> None:
    """bf16 is never shipped today; the probe's measurement says why."""
    probe = probe_bf16()
    if not (probe.get("supported") and probe.get("faster")):
        manifest["variants_not_shipped"]["bf16"] = {
            "reason": "ONNX Runtime's CPU provider has no faster bf16 MatMul on this machine",
            "probe": probe,
            "alternative": "int8 (shipped) or torch bf16 outside the ONNX runtime",
        }
    else:  # pragma: no cover - no such kernel in the ORT builds we have seen
        manifest["variants_not_shipped"]["bf16"] = {
            "reason": "bf16 kernels exist but bf16 graph conversion is not implemented",
            "probe": probe,
        }


def probe_bf16(threads: int = 2, m: int = 256, k: int = 768, n: int = 3072, reps: int = 20) -> dict[str, Any]:
    """Can ONNX Runtime's CPU provider run a bf16 MatMul, and is it faster than fp32? Measured, not assumed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def build(bf16: bool) -> bytes:
        w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
        dt = TensorProto.BFLOAT16 if bf16 else TensorProto.FLOAT
        init = numpy_helper.from_array(w, "W")
        nodes = [helper.make_node("MatMul", ["X", "Wc"], ["Y"])]
        nodes.insert(0, helper.make_node("Cast", ["W"], ["Wc"], to=dt))
        graph = helper.make_graph(
            nodes,
            "probe",
            [helper.make_tensor_value_info("X", dt, [m, k])],
            [helper.make_tensor_value_info("Y", dt, [m, n])],
            [init],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def timed(model: bytes, x: Any) -> float:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        sess.run(None, {"X": x})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, {"X": x})
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    x32 = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    flop = 2.0 * m * k * n
    t32 = timed(build(False), x32)
    result: dict[str, Any] = {
        "op": f"MatMul [{m},{k}]x[{k},{n}]",
        "threads": threads,
        "fp32_gflops": round(flop / t32 / 1e9, 1),
        "onnxruntime": package_version("onnxruntime"),
    }
    try:
        import ml_dtypes  # numpy's bf16 type; a dependency of onnx

        tb = timed(build(True), x32.astype(ml_dtypes.bfloat16))
    except Exception as exc:  # ORT raises NOT_IMPLEMENTED when it has no bf16 kernel
        result.update(supported=False, faster=False, error=str(exc).splitlines()[0][:300])
        return result
    result.update(supported=True, bf16_gflops=round(flop / tb / 1e9, 1), faster=bool(tb < t32))
    return result
