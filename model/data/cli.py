"""``albef data synth`` (the synthetic benchmark) and ``albef data check`` (validate annotation files)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from albef.errors import CLIError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="datasets: generate the synthetic benchmark, check annotation files")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True

    s = data_sub.add_parser("synth", help="render the synthetic shapes benchmark (official JSON formats)")
    s.add_argument(
        "out", type=Path, help="output folder (created; must not exist or be empty unless --force)"
    )
    s.add_argument("--images", type=int, required=True, help="number of images (all splits together)")
    s.add_argument("--seed", type=int, default=0, help="random seed (output is byte-identical per seed)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=synth_command)

    c = data_sub.add_parser("check", help="load annotation sources as training would and report bad rows")
    c.add_argument("sources", nargs="+", help="JSON / JSONL / CSV / TSV annotation files or image folders")
    c.add_argument("--image-root", type=Path, default=None, help="folder image paths are relative to")
    c.add_argument("--eval", action="store_true", help="read as an eval set (val/test format)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=check_command)


def synth_command(args: argparse.Namespace) -> int:
    from albef.model.data.synth import generate

    if args.images < 1:
        raise UsageError("--images must be >= 1")
    if args.size < 32:
        raise UsageError("--size must be >= 32")
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"{args.out} exists and is not a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise CLIError(f"{args.out} exists and is not empty; pass --force to replace it")
    try:
        counts = generate(args.out, args.images, args.seed, args.size, overwrite=args.force)
    except FileExistsError as exc:  # created by someone else meanwhile
        raise CLIError(str(exc)) from exc
    im, cap = counts["images"], counts["captions"]
    print(  # noqa: T201
        f"wrote {args.out}: {im['total']} images (train {im['train']} / val {im['val']} / test {im['test']}), "
        f"captions train {cap['train']} / val {cap['val']} / test {cap['test']}"
    )
    return 0


def check_command(args: argparse.Namespace) -> int:
    from albef.model.data.annotations import load_eval_set, load_pairs

    try:
        if args.eval:
            if len(args.sources) != 1:
                raise UsageError("--eval takes exactly one source")
            es = load_eval_set(args.sources[0], args.image_root)
            summary = {"images": len(es.images), "texts": len(es.texts), "problems": []}
        else:
            items, problems = load_pairs(args.sources, args.image_root)
            summary = {
                "pairs": len(items),
                "images": len({i.image_id for i in items}),
                "problems": problems,
            }
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    if args.json:
        print(json.dumps(summary, indent=2))  # noqa: T201
    else:
        counts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "problems")
        print(f"{counts}, problems {len(summary['problems'])}")  # noqa: T201
        for p in summary["problems"][:50]:
            print(f"  {p['source']}: {p['error']} ({p['path']})")  # noqa: T201
        if len(summary["problems"]) > 50:
            print(f"  ... {len(summary['problems']) - 50} more")  # noqa: T201
    return 1 if summary["problems"] else 0
