"""Experiment (session 25): where an image->text re-rank call's time goes, by ONNX Runtime operator.

Exports the base configuration's ``image_kv`` and ``itm_kv`` graphs (random weights, seed 0, 384 px) with the
code of the checkout it runs in, quantises them as the int8 variant does, and profiles ``itm_kv`` for one
image against ``--k`` texts of the synthetic captions' lengths (ONNX Runtime's own profiler, 2 threads,
spinning off as in the runtime; the first ``--warmup`` runs are left out). Prints the kernel time per run by
operator and the slowest nodes of the kinds named in ``--nodes``.

    python scripts/experiments/profile_itm_kv.py --variant int8
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from albef.model.data.synth import captions_for, make_scenes
from albef.model.export_onnx import export_graphs
from albef.model.factory import create_model
from albef.model.quantize import quantize_int8
from albef.model.runtime import session_options
from albef.model.text import AlbefTokenizer, default_vocab_path


def session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    so = session_options(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def text_mask(k: int, seed: int) -> np.ndarray:
    """Masks of ``k`` captions of the synthetic grammar, trimmed to the longest (as the runtime trims)."""
    rng = random.Random(seed)
    caps: list[str] = []
    for scene in make_scenes(max(8, k), seed):
        caps.extend(captions_for(scene, [], rng, 1))
    _, mask = AlbefTokenizer.from_vocab(default_vocab_path())(caps[:k])
    return mask[:, : int(mask.sum(1).max())].astype(np.int64)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=("fp32", "int8"), default="int8")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nodes", default="Transpose,Gather,Squeeze,If", help="operators to list node by node")
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model("albef-base", image_res=384).eval()
    with tempfile.TemporaryDirectory(prefix="albef-prof-kv-") as tmp:
        root = Path(tmp)
        files = export_graphs(model, root, roles=["image_kv", "itm_kv"])
        if args.variant == "int8":
            files = quantize_int8(root, files)
        rng = np.random.default_rng(0)
        image = rng.standard_normal((1, 577, 768)).astype(np.float32)
        kv = session(root / files["image_kv"], args.threads).run(None, {"image_tokens": image})
        mask = text_mask(args.k, 1)
        feed = {"text_tokens": rng.standard_normal((*mask.shape, 768)).astype(np.float32), "text_mask": mask}
        sess = session(root / files["itm_kv"], args.threads, str(root / "profile"))
        feed.update({i.name: kv[j] for j, i in enumerate(sess.get_inputs()[2:])})
        for _ in range(args.warmup + args.runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[args.warmup]["ts"]
    by_op: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[tuple[str, str]] = collections.Counter()
    shapes: dict[tuple[str, str], object] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            key = (e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))
            by_op[key[0]] += e["dur"]
            by_node[key] += e["dur"]
            shapes[key] = e["args"].get("input_type_shape")
    n = args.runs
    wall = sorted(r["dur"] / 1000 for r in runs[args.warmup :])
    print(  # noqa: T201
        json.dumps(
            {
                "variant": args.variant,
                "k": args.k,
                "text_lengths": {"mean": float(mask.sum(1).mean()), "max": int(mask.shape[1])},
                "run_ms_median": round(wall[len(wall) // 2], 2),
                "kernel_ms_per_run": round(sum(by_op.values()) / n / 1000, 2),
            }
        )
    )
    for op, us in by_op.most_common(16):
        print(f"  {op:26s} {us / n / 1000:6.2f} ms")  # noqa: T201
    wanted = set(args.nodes.split(","))
    for (op, name), us in by_node.most_common():
        if op in wanted and us / n >= 50:
            print(f"  {op:12s} {name[:44]:44s} {us / n:6.0f} us  {shapes[(op, name)]}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
