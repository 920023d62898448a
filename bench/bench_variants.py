"""Retrieval quality of each exported variant on the synthetic benchmark (official protocol, ONNX Runtime).

Exports CHECKPOINT with fp32, int8 (per-tensor) and the bf16 probe, evaluating every shipped variant with
the runtime (``albef export --eval-data`` does the same); then re-quantises a copy per output channel
and evaluates that too, to decide which int8 granularity to ship. Writes bench/results/export_variants.json.

    python bench/bench_variants.py --checkpoint model/weights/albef-tiny-synth \
        --data runs/synth3000/test.json --k-test 16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="official val/test JSON (e.g. synth test.json)")
    ap.add_argument("--image-root", type=Path, default=None)
    ap.add_argument("--k-test", type=int, default=16)
    ap.add_argument("--bundle", type=Path, default=Path("runs/bundle-tiny-synth"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_variants.json"))
    args = ap.parse_args()

    from albef.model.export import export_bundle, make_evaluator, write_manifest
    from albef.model.factory import create_model
    from albef.model.quantize import quantize_int8

    started = time.perf_counter()
    load_before = os.getloadavg()
    model = create_model(None, args.checkpoint)
    evaluator = make_evaluator(args.data, args.image_root, args.k_test)
    manifest = export_bundle(
        model,
        args.bundle,
        variants=["fp32", "int8", "bf16"],
        checkpoint=args.checkpoint,
        overwrite=True,
        evaluator=evaluator,
    )
    variants: dict[str, Any] = {
        v: {"eval": info.get("eval"), "validation": info.get("validation"), "weights": info.get("weights")}
        for v, info in manifest["variants"].items()
    }
    # int8 per output channel, on a copy of the same fp32 graphs
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, copy)
        files32 = manifest["variants"]["fp32"]["files"]
        quantize_int8(copy, files32, per_channel=True)
        base = {k: v for k, v in manifest.items() if k not in ("files", "bundle_id")}
        write_manifest(copy, base)
        pc_eval = evaluator(copy, "int8")
        pc_eval.pop("scores", None)
        variants["int8_per_channel"] = {"eval": pc_eval, "weights": "int8 per output channel (7-bit range)"}
    result = {
        "checkpoint": str(args.checkpoint),
        "bundle": str(args.bundle),
        "bundle_id": manifest["bundle_id"],
        "data": str(args.data),
        "k_test": args.k_test,
        "variants": variants,
        "variants_not_shipped": manifest.get("variants_not_shipped"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["python", *sys.argv]),
    }
    write_result(args.out, result)
    for name, info in variants.items():
        e = info["eval"]
        print(
            f"{name:18s} ITM txt_r1 {e['itm']['txt_r1']:6.2f} img_r1 {e['itm']['img_r1']:6.2f} "
            f"r_mean {e['itm']['r_mean']:6.2f} | ITC txt_r1 {e['itc']['txt_r1']:6.2f} img_r1 {e['itc']['img_r1']:6.2f}"
        )
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
