"""Export and inference throughput of the BASE configuration (random weights: speed does not depend on them).

Measures images/s (batch 8, 384 px ViT-B/16), texts/s (batch 64, 30 tokens) and ITM pairs/s for one query
image against k=16 candidate texts, plain (cross-attention K/V recomputed per pair) and K/V-cached (image K/V
once per query), for torch fp32, torch bf16 (bf16 weights), ONNX Runtime fp32 and ONNX Runtime int8. Each
figure is set against this machine's measured GEMM peak (bench/gemm.py) via FLOP counts derived from the
config. Writes bench/results/export.json.

    python bench/bench_export.py [--config albef-base] [--threads 2] [--bundle runs/bench-albef-base]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from gemm import _median_time, ort_int8_gemm_gops, torch_peaks  # noqa: E402


# -- FLOP counts (multiply-add = 2 FLOP; softmax, LayerNorm, GELU not counted) ------------------------------
def vit_flops(cfg: Any) -> float:
    v = cfg.vision
    n, w = v.num_patches + 1, v.width
    hidden = int(w * v.mlp_ratio)
    per_layer = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * hidden
    patch = 2 * v.num_patches * (3 * v.patch_size**2) * w
    return float(v.depth * per_layer + patch + 2 * w * cfg.embed_dim)


def text_flops(cfg: Any, length: int = 30) -> float:
    t = cfg.text
    h, i = t.hidden_size, t.intermediate_size
    per_layer = (
        2 * length * h * 3 * h + 2 * 2 * length * length * h + 2 * length * h * h + 2 * 2 * length * h * i
    )
    return float(t.fusion_layer * per_layer + 2 * h * cfg.embed_dim)


def itm_pair_flops(cfg: Any, length: int = 30, kv_cached: bool = False) -> float:
    """One (text, image) pair through the fusion layers and the ITM head. With ``kv_cached`` the image's
    cross-attention keys/values (2 x N x W x H per layer) are not recomputed for the pair."""
    t, v = cfg.text, cfg.vision
    h, i, n, w = t.hidden_size, t.intermediate_size, v.num_patches + 1, t.encoder_width
    self_attn = 2 * length * h * 3 * h + 2 * 2 * length * length * h + 2 * length * h * h
    cross = 2 * length * h * h + 2 * 2 * length * n * h + 2 * length * h * h
    kv = 2 * 2 * n * w * h
    ffn = 2 * 2 * length * h * i
    layers = t.num_hidden_layers - t.fusion_layer
    return float(layers * (self_attn + cross + ffn + (0 if kv_cached else kv)) + 2 * h * 2)


def image_kv_flops(cfg: Any) -> float:
    t, v = cfg.text, cfg.vision
    return float(
        (t.num_hidden_layers - t.fusion_layer) * 2 * 2 * (v.num_patches + 1) * t.encoder_width * t.hidden_size
    )


# -- inputs ----------------------------------------------------------------------------------------------
WORDS = (
    "a small large red green blue yellow purple circle square triangle left right above below of the".split()
)


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    # long enough that every caption fills the 30 tokens: the FLOP counts assume L = 30
    return [" ".join(rng.choice(WORDS, 40)) for _ in range(n)]


def make_images(n: int, seed: int = 0) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]


# -- measurement -----------------------------------------------------------------------------------------
def throughput(fn: Any, items: int, reps: int, budget_s: float) -> dict[str, float]:
    t = _median_time(fn, reps, budget_s)
    return {"items_per_s": round(items / t, 3), "seconds_per_call": round(t, 4)}


def bench_torch(
    model: Any,
    pixels: np.ndarray,
    ids: np.ndarray,
    mask: np.ndarray,
    k: int,
    dtype: Any,
    reps: int,
    budget_s: float,
) -> dict[str, Any]:
    import torch

    px = torch.from_numpy(pixels).to(dtype)
    i, m = torch.from_numpy(ids), torch.from_numpy(mask)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        out["images"] = throughput(lambda: model.encode_image(px), len(px), reps, budget_s)
        out["texts"] = throughput(lambda: model.encode_text(i, m), len(i), reps, budget_s)
        _, img_tok = model.encode_image(px[:1])
        _, txt_tok = model.encode_text(i[:k], m[:k])
        mk = m[:k]
        out["itm_plain"] = throughput(
            lambda: model.itm_logits(txt_tok, mk, img_tok.expand(k, -1, -1)), k, reps, budget_s
        )
        out["itm_kv"] = throughput(
            lambda: model.itm_logits_kv(txt_tok, mk, model.image_kv(img_tok)), k, reps, budget_s
        )
    return out


def bench_ort(
    bundle: Any, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, k: int, reps: int, budget_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["images"] = throughput(lambda: bundle.encode_pixels(pixels), len(pixels), reps, budget_s)
    out["texts"] = throughput(lambda: bundle.encode_ids(ids, mask), len(ids), reps, budget_s)
    _, img_tok = bundle.encode_pixels(pixels[:1])
    _, txt_tok = bundle.encode_ids(ids[:k], mask[:k])
    mk = mask[:k]
    out["itm_plain"] = throughput(
        lambda: bundle.itm_scores(txt_tok, mk, np.repeat(img_tok, k, axis=0)), k, reps, budget_s
    )
    out["itm_kv"] = throughput(lambda: bundle.itm_scores_for_image(img_tok, txt_tok, mk), k, reps, budget_s)
    return out


def add_peak_share(res: dict[str, Any], flops: dict[str, float], peak_gflops: float) -> None:
    for key, per_item in flops.items():
        r = res[key]
        gflops = r["items_per_s"] * per_item / 1e9
        r["gflops"] = round(gflops, 1)
        r["share_of_peak"] = round(gflops / peak_gflops, 3)


def dir_bytes(path: Path, names: list[str]) -> int:
    return sum((path / n).stat().st_size for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="albef-base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per figure (median)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per figure before stopping early")
    ap.add_argument("--bundle", type=Path, default=Path("runs/bench-albef-base"))
    ap.add_argument("--reuse", action="store_true", help="reuse an existing bundle at --bundle (skip export)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    args = ap.parse_args()

    import torch

    from albef.model.config import get_config
    from albef.model.export import export_bundle
    from albef.model.factory import create_model
    from albef.model.runtime import Bundle

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "config": args.config,
        "threads": args.threads,
        "batch": {"images": args.images, "texts": args.texts, "itm_k": args.k, "text_length": 30},
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "command": " ".join(["python", *sys.argv]),
    }
    print("GEMM peaks ...", flush=True)
    peaks = {
        **torch_peaks(4096, args.threads, ("float32", "bfloat16")),
        "ort_int8_gops": round(ort_int8_gemm_gops(4096, args.threads), 1),
    }
    result["gemm_4096"] = peaks
    print(json.dumps(peaks), flush=True)

    cfg = get_config(args.config)
    torch.manual_seed(0)
    model = create_model(cfg)
    if not (args.reuse and (args.bundle / "manifest.json").is_file()):
        print("exporting ...", flush=True)
        if args.bundle.exists():
            shutil.rmtree(args.bundle)
        t0 = time.perf_counter()
        export_bundle(model, args.bundle, variants=["fp32", "int8", "bf16"], progress=True)
        result["export_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    result["bundle"] = {
        "path": str(args.bundle),
        "bundle_id": manifest["bundle_id"],
        "timings": manifest.get("timings"),
        "variant_bytes": {
            v: dir_bytes(args.bundle, list(info["files"].values()))
            for v, info in manifest["variants"].items()
        },
        "validation": {v: info.get("validation") for v, info in manifest["variants"].items()},
        "variants_not_shipped": manifest.get("variants_not_shipped"),
    }

    fp32 = Bundle.load(args.bundle, intra_op_threads=args.threads, inter_op_threads=1)
    pixels = fp32.preprocess(make_images(args.images))
    ids, mask = fp32.tokenize(make_texts(args.texts))
    assert mask.sum(1).min() == 30, "benchmark captions must fill all 30 tokens"
    k = args.k
    flops = {
        "images": vit_flops(cfg),
        "texts": text_flops(cfg),
        "itm_plain": itm_pair_flops(cfg),
        # amortised: the image's K/V once per query, shared by its k candidates
        "itm_kv": itm_pair_flops(cfg, kv_cached=True) + image_kv_flops(cfg) / k,
    }
    result["flops_per_item"] = {key: round(v / 1e9, 3) for key, v in flops.items()} | {
        "image_kv_per_query": round(image_kv_flops(cfg) / 1e9, 3),
        "unit": "GFLOP",
    }
    paths: dict[str, Any] = {}
    print("torch fp32 ...", flush=True)
    paths["torch_fp32"] = bench_torch(model, pixels, ids, mask, k, torch.float32, args.reps, args.budget)
    add_peak_share(paths["torch_fp32"], flops, peaks["torch_fp32_gflops"])
    if peaks["torch_bf16_gflops"] is None:  # no native bf16 here: the path would take ~100x the fp32 time
        result["skipped"] = {"torch_bf16": peaks["skipped"]["torch_bf16_gflops"]}
        print(f"torch bf16 skipped: {result['skipped']['torch_bf16']}", flush=True)
    else:
        print("torch bf16 ...", flush=True)
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        paths["torch_bf16"] = bench_torch(
            model_bf16, pixels, ids, mask, k, torch.bfloat16, args.reps, args.budget
        )
        add_peak_share(paths["torch_bf16"], flops, peaks["torch_bf16_gflops"])
        del model_bf16
    print("ORT fp32 ...", flush=True)
    paths["ort_fp32"] = bench_ort(fp32, pixels, ids, mask, k, args.reps, args.budget)
    add_peak_share(paths["ort_fp32"], flops, peaks["torch_fp32_gflops"])
    del fp32
    if "int8" in manifest["variants"]:
        print("ORT int8 ...", flush=True)
        q = Bundle.load(args.bundle, variant="int8", intra_op_threads=args.threads, inter_op_threads=1)
        paths["ort_int8"] = bench_ort(q, pixels, ids, mask, k, args.reps, args.budget)
        add_peak_share(paths["ort_int8"], flops, peaks["ort_int8_gops"])
    result["paths"] = paths
    result["peak_used_for_share"] = {
        "torch_fp32": "torch_fp32_gflops",
        "torch_bf16": "torch_bf16_gflops",
        "ort_fp32": "torch_fp32_gflops",
        "ort_int8": "ort_int8_gops",
    }
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result(args.out, result)
    print(json.dumps({p: {k2: v["items_per_s"] for k2, v in r.items()} for p, r in paths.items()}, indent=2))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
