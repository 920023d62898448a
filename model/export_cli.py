"""``albef export``: a checkpoint -> a model bundle (ONNX graphs, tokenizer, preprocessing, manifest)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from albef.errors import CLIError, UsageError
from albef.model.export_defaults import DEFAULT_OPSET, FP32_TOLERANCE
from albef.model.quantize import INT8_SCOPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to an ONNX model bundle for the torch-free runtime"
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="our checkpoint folder (config.json + model.safetensors) or an official .pth",
    )
    p.add_argument("out_dir", type=Path, help="bundle folder to create (built beside it, then renamed)")
    p.add_argument(
        "--config",
        default=None,
        help="model config name or JSON (default: the checkpoint's own, else albef-base)",
    )
    p.add_argument(
        "--variants", default="fp32,int8", help="comma list from fp32,int8,bf16 (default fp32,int8)"
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--vocab", type=Path, default=None, help="vocab.txt (default: ALBEF_VOCAB or the bundled copy)"
    )
    p.add_argument(
        "--image-res", type=int, default=None, help="export at another resolution (pos_embed resized)"
    )
    p.add_argument(
        "--int8-per-channel",
        action="store_true",
        help="int8 weights with one scale per output channel (slower export)",
    )
    p.add_argument(
        "--int8-scope",
        choices=INT8_SCOPES,
        default="all",
        help="int8 for every graph (all, default) or only the re-ranking graphs (rerank: the encoders stay "
        "fp32, so features and indexes are fp32's)",
    )
    p.add_argument(
        "--explain-layer",
        type=int,
        default=None,
        help="fusion layer (0-based among them) whose cross-attention /v1/explain explains "
        "(default: the official third, or the second-to-last of fewer)",
    )
    p.add_argument(
        "--no-explain",
        action="store_true",
        help="leave out the explain graph (the bundle serves search but not /v1/explain)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="official val/test JSON: measure every variant's R@K with the runtime into the manifest",
    )
    p.add_argument("--image-root", type=Path, default=None, help="image folder for --eval-data paths")
    p.add_argument("--k-test", type=int, default=16, help="ITM re-rank depth for --eval-data (default 16)")
    p.add_argument(
        "--json", action="store_true", help="print the manifest summary as one JSON object (for scripts)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=FP32_TOLERANCE,
        help=f"max |torch - ORT| for fp32 (default {FP32_TOLERANCE:g})",
    )
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    allowed = ("fp32", "int8", "bf16")
    bad = [v for v in variants if v not in allowed]
    if bad or not variants:
        raise UsageError(
            f"--variants: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(allowed)}"
        )
    if not args.checkpoint.exists():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    if args.out_dir.exists() and not args.force:
        raise CLIError(f"{args.out_dir} exists; pass --force to replace it")
    if args.vocab is not None and not args.vocab.is_file():
        raise CLIError(f"vocab file not found: {args.vocab}")
    if args.eval_data is not None and not args.eval_data.is_file():
        raise CLIError(f"eval data not found: {args.eval_data}")
    if not 7 <= args.opset <= 23:
        raise UsageError(f"--opset {args.opset} is outside the supported range 7..23")

    from albef.model.checkpoint import CheckpointError
    from albef.model.export import ExportError, export_bundle, make_evaluator
    from albef.model.factory import create_model

    try:
        model = create_model(args.config, args.checkpoint, args.image_res)
    except (CheckpointError, ValueError, OSError) as exc:
        raise CLIError(f"cannot load {args.checkpoint}: {exc}") from exc
    evaluator = None
    if args.eval_data is not None:
        try:
            evaluator = make_evaluator(args.eval_data, args.image_root, args.k_test)
        except (ValueError, OSError) as exc:
            raise CLIError(f"--eval-data: {exc}") from exc
    try:
        manifest = export_bundle(
            model,
            args.out_dir,
            variants=variants,
            opset=args.opset,
            vocab=args.vocab,
            checkpoint=args.checkpoint,
            overwrite=args.force,
            evaluator=evaluator,
            tolerance=args.tolerance,
            int8_per_channel=args.int8_per_channel,
            int8_scope=args.int8_scope,
            explain=not args.no_explain,
            explain_layer=args.explain_layer,
        )
    except (ExportError, ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    total = sum(f["bytes"] for f in manifest["files"].values())
    if args.json:
        print(  # noqa: T201
            json.dumps(
                {
                    "bundle": str(args.out_dir.resolve()),
                    "bundle_id": manifest["bundle_id"],
                    "bytes": total,
                    "variants": manifest["variants"],
                    "variants_not_shipped": manifest.get("variants_not_shipped", {}),
                    "explain": manifest.get("explain"),
                },
                default=str,
            )
        )
        return 0
    val = manifest["variants"]["fp32"]["validation"]
    print(  # noqa: T201
        f"wrote {args.out_dir} (bundle {manifest['bundle_id'][:16]}, {total / 1e6:.1f} MB, "
        f"variants {','.join(manifest['variants'])})"
    )
    print(  # noqa: T201
        f"fp32 max |torch - ORT|: image_emb {val['image_emb']:.1e}, text_emb {val['text_emb']:.1e}, "
        f"itm {val['itm_logits']:.1e}"
    )
    if "explain" in manifest:
        ex = manifest["explain"]
        print(  # noqa: T201
            f"explain: fusion layer {ex['fusion_layer']} (encoder layer {ex['encoder_layer']}), max |autograd - "
            f"ORT|: attention {ex['validation']['attention']:.1e}, gradient {ex['validation']['attention_grad']:.1e}"
        )
    if "int8" in manifest["variants"]:
        q = manifest["variants"]["int8"]["validation"]
        print(  # noqa: T201
            f"int8 ({manifest['variants']['int8']['scope']} scope) vs fp32 on {q['cpu']['model']} "
            f"({q['cpu']['int8_kernel']} int8 kernel): min cosine "
            f"image {q['image_emb_min_cos']:.4f} text {q['text_emb_min_cos']:.4f}, ITM logit max diff "
            f"{q['itm_logits']:.3f}; within the bounds"
        )
    for name, info in manifest.get("variants_not_shipped", {}).items():
        print(f"{name} not shipped: {info['reason']}")  # noqa: T201
    for name, info in manifest["variants"].items():
        if "eval" in info:
            e = info["eval"]
            print(  # noqa: T201
                f"{name}: ITM r_mean {e['itm']['r_mean']:.2f} txt_r1 {e['itm']['txt_r1']:.2f} "
                f"img_r1 {e['itm']['img_r1']:.2f} (ITC r_mean {e['itc']['r_mean']:.2f})"
            )
    return 0
