"""``albef convert`` and ``albef info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from albef.errors import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official ALBEF .pth into this project's format")
    p.add_argument(
        "checkpoint", type=Path, help="official ALBEF.pth / ALBEF_4M.pth / flickr30k.pth / mscoco.pth"
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument(
        "--config", default="albef-base", help="model config name or JSON path (default albef-base)"
    )
    p.add_argument("--image-res", type=int, default=None, help="resolution to convert to (pos_embed resized)")
    p.add_argument("--keep-mlm", action="store_true", help="keep the MLM head of a pretraining checkpoint")
    p.set_defaults(func=convert_command)

    p = sub.add_parser("info", help="print a checkpoint's config, parameter counts and key summary")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=info_command)


def convert_command(args: argparse.Namespace) -> int:
    import hashlib

    from albef.model.checkpoint import CheckpointError, save_albef
    from albef.model.factory import create_model

    if not args.checkpoint.is_file():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    try:
        model = create_model(args.config, args.checkpoint, args.image_res, with_mlm=args.keep_mlm)
    except (CheckpointError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    digest = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()
    save_albef(model, args.out_dir, source={"path": str(args.checkpoint), "sha256": digest})
    print(f"wrote {args.out_dir} ({model.num_parameters()['total']:,} parameters)")  # noqa: T201
    return 0


def checkpoint_info(path: Path) -> dict[str, Any]:
    from albef.model.checkpoint import is_albef_checkpoint, key_summary, read_albef, read_official

    if is_albef_checkpoint(path):
        meta, state = read_albef(path)
        kind, config = "albef-search", meta["model"]
    else:
        state, kind = read_official(path)
        kind = f"official-{kind}"
        config = None
    params = sum(int(v.numel()) for k, v in state.items() if v.is_floating_point())
    pos = state.get("visual_encoder.pos_embed")
    return {
        "path": str(path),
        "kind": kind,
        "config": config,
        "keys": len(state),
        "float_elements": params,
        "pos_embed": list(pos.shape) if pos is not None else None,
        "has_momentum": any(k.startswith("visual_encoder_m.") for k in state),
        "has_queues": "image_queue" in state,
        "has_mlm_head": any(".cls.predictions." in k for k in state),
        "groups": key_summary(state),
    }


def info_command(args: argparse.Namespace) -> int:
    from albef.model.checkpoint import CheckpointError

    if not args.checkpoint.exists():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    try:
        info = checkpoint_info(args.checkpoint)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        print(json.dumps(info, indent=2))  # noqa: T201
        return 0
    lines = [
        f"checkpoint   {info['path']}",
        f"kind         {info['kind']}",
        f"keys         {info['keys']}",
        f"parameters   {info['float_elements']:,} (floating-point elements)",
        f"pos_embed    {info['pos_embed']}",
        f"momentum     {info['has_momentum']}   queues {info['has_queues']}   mlm head {info['has_mlm_head']}",
    ]
    if info["config"]:
        cfg = info["config"]
        lines.append(
            f"config       {cfg['name']}: image_res {cfg['vision']['image_res']}, "
            f"vision {cfg['vision']['width']}x{cfg['vision']['depth']}, "
            f"text {cfg['text']['hidden_size']}x{cfg['text']['num_hidden_layers']} "
            f"(fusion from {cfg['text']['fusion_layer']}), embed {cfg['embed_dim']}"
        )
    lines.append("groups:")
    for group, g in sorted(info["groups"].items()):
        lines.append(f"  {group:<40} {g['keys']:>5} keys {g['numel']:>14,} elements")
    print("\n".join(lines))  # noqa: T201
    return 0
