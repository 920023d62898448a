"""int8 against fp32 on both CPU classes: our scheme (7-bit weights) and full-range int8 weights.

ONNX Runtime picks its int8 GEMM kernel by the CPU's flags: with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) u8 x s8
products go straight into 32 bits; on an AVX2-only CPU pairs are summed in a saturating 16-bit register.
This bench measures both. The native run uses this machine's kernel; when ``qemu-x86_64`` is installed
(Debian's ``qemu-user``), the same measurement runs again under it with ``-cpu EPYC-Rome`` (AVX2 and FMA,
no AVX-512, no VNNI), so ONNX Runtime dispatches its AVX2 kernels: the arithmetic is the real instruction
sequence, emulated instruction by instruction (timings under emulation mean nothing and are not reported).

    python bench/bench_int8.py [--checkpoint model/weights/albef-tiny-synth | random-tiny]
                               [--emulate EPYC-Rome] [--out bench/results/int8.json]

Figures per scheme (INT8_BOUNDS names the ones the variant must meet): min cosine of image and text
embeddings, largest ITM logit difference (on fp32 token features), and the re-ranking top-1 agreement on a
synthetic split (text->image and image->text, k_test 8; small, because the emulated run is ~100x slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402

SCHEMES = {
    "ours (7-bit weights, per tensor)": {"reduce_range": True, "per_channel": False},
    "ours, per channel": {"reduce_range": True, "per_channel": True},
    "full-range int8 weights (before)": {"reduce_range": False, "per_channel": False},
}
RANDOM = "random-tiny"
SPLIT = {"images": 300, "seed": 5, "k_test": 8}  # a seed used only here; test split: 30 images, ~120 captions


def prepare(checkpoint: Path, root: Path) -> dict[str, Path]:
    """fp32 bundle of the checkpoint, plus one bundle per scheme whose int8 files use that scheme."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from albef.model.data.synth import generate
    from albef.model.export import export_bundle, write_manifest
    from albef.model.factory import create_model

    if str(checkpoint) == RANDOM:  # what the tests export: albef-tiny with random weights, seed 0
        import torch

        torch.manual_seed(0)
        model, checkpoint = create_model("albef-tiny"), None
    else:
        model = create_model(None, checkpoint)
    export_bundle(model, root / "fp32", variants=["fp32"], checkpoint=checkpoint, progress=False)
    generate(root / "synth", SPLIT["images"], seed=SPLIT["seed"], size=128, progress=False)
    manifest = json.loads((root / "fp32" / "manifest.json").read_text())
    logging.getLogger().setLevel(logging.ERROR)
    out = {}
    for i, (name, kw) in enumerate(SCHEMES.items()):
        d = root / f"scheme{i}"
        shutil.copytree(root / "fp32", d)
        files = {}
        for role, f in manifest["variants"]["fp32"]["files"].items():
            files[role] = f"{role}.int8.onnx"
            quantize_dynamic(
                str(d / f),
                str(d / files[role]),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                **kw,
            )
        base = {k: v for k, v in manifest.items() if k not in ("files", "bundle_id")}
        base["variants"] = {**base["variants"], "int8": {"files": files}}
        write_manifest(d, base)
        out[name] = d
    return out


def measure(root: Path) -> dict[str, Any]:
    """Run in the process whose CPU (native or emulated) is being measured."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.export import rerank_agreement, runtime_score_matrices
    from albef.model.quantize import max_int8_weight
    from albef.model.runtime import Bundle

    es = load_eval_set(root / "synth" / "test.json")
    ref = Bundle.load(root / "fp32", intra_op_threads=2)
    sims, i2t, t2i = runtime_score_matrices(ref, es.images, es.texts, SPLIT["k_test"])
    e_img, tok_img = ref.encode_images(es.images)
    e_txt, tok_txt, mask = ref.encode_texts(es.texts)
    results: dict[str, Any] = {}
    for i, name in enumerate(SCHEMES):
        d = root / f"scheme{i}"
        q = Bundle.load(d, variant="int8", intra_op_threads=2)
        q_img, _ = q.encode_images(es.images)
        q_txt, _, _ = q.encode_texts(es.texts)
        itm_diff = 0.0
        for j in range(min(4, len(es.images))):  # every caption against 4 images, on fp32 token features
            img = np.repeat(tok_img[j : j + 1], len(es.texts), axis=0)
            itm_diff = max(
                itm_diff,
                float(np.abs(ref.itm_scores(tok_txt, mask, img) - q.itm_scores(tok_txt, mask, img)).max()),
            )
        _, qi2t, qt2i = runtime_score_matrices(q, es.images, es.texts, SPLIT["k_test"])
        results[name] = {
            "image_emb_min_cos": round(float((e_img * q_img).sum(1).min()), 6),
            "text_emb_min_cos": round(float((e_txt * q_txt).sum(1).min()), 6),
            "itm_logits": round(itm_diff, 4),
            "max_int8_weight": max(
                max_int8_weight(d / f"{r}.int8.onnx")
                for r in ("image_encoder", "text_encoder", "itm", "image_kv", "itm_kv")
            ),
            **rerank_agreement({"i2t": i2t, "t2i": t2i}, {"i2t": qi2t, "t2i": qt2i}),
        }
    return results


def _worker(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one measuring process; on failure, show its stderr (the traceback) rather than only its status."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("model/weights/albef-tiny-synth"),
        help=f"checkpoint folder, or {RANDOM!r} for the tests' random albef-tiny (seed 0)",
    )
    ap.add_argument("--emulate", default="EPYC-Rome", help="qemu CPU model for the AVX2 run ('' to skip)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8.json"))
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker)))
        return

    from albef.cpu import cpu_info
    from albef.model.quantize import INT8_BOUNDS, bounds_dict, check_int8

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        root = Path(tmp)
        prepare(args.checkpoint, root)
        runs: dict[str, Any] = {}
        cmd = [sys.executable, __file__, "--worker", str(root)]
        native = _worker(cmd)
        runs["native"] = {"cpu": cpu_info(), "schemes": json.loads(native.stdout.splitlines()[-1])}
        qemu = shutil.which("qemu-x86_64")
        if args.emulate and qemu:
            t0 = time.perf_counter()
            emu = _worker([qemu, "-cpu", args.emulate, *cmd])
            runs["emulated"] = {
                "cpu": {
                    "model": f"qemu-x86_64 -cpu {args.emulate} (TCG)",
                    "int8_kernel": "avx2",
                    "flags": ["avx2", "fma", "f16c"],
                },
                "seconds": round(time.perf_counter() - t0, 1),
                "schemes": json.loads(emu.stdout.splitlines()[-1]),
            }
        elif args.emulate:
            runs["emulated"] = {"skipped": "qemu-x86_64 not installed (apt-get install qemu-user)"}
    for run in runs.values():
        for figures in run.get("schemes", {}).values():
            figures["failed"] = check_int8(figures)
    result = {
        "checkpoint": str(args.checkpoint),
        "split": {**SPLIT, "split": "test"},
        "bounds": bounds_dict(INT8_BOUNDS),
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.out, result)
    for where, run in runs.items():
        for name, f in run.get("schemes", {}).items():
            print(
                f"{where:9s} {name:34s} cos img {f['image_emb_min_cos']:.4f} txt {f['text_emb_min_cos']:.4f} "
                f"itm {f['itm_logits']:.3f} agree t2i {f['rerank_top1_agreement_t2i']:.3f} "
                f"i2t {f['rerank_top1_agreement_i2t']:.3f} {'OK' if not f['failed'] else f['failed']}"
            )
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
