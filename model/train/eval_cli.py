"""``albef eval``: the official retrieval evaluation of a checkpoint on a val/test annotation file."""

from __future__ import annotations

import argparse
from pathlib import Path

from albef.errors import CLIError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="retrieval evaluation (ITC shortlist + ITM re-ranking, recall@1/5/10 both ways)",
        description="Evaluate a checkpoint as ALBEF's Retrieval.py --evaluate does; prints the ITC-only and "
        "ITC+ITM tables, optionally writes a JSON report and a plot of R@1 against K.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint folder or an official .pth")
    p.add_argument(
        "--data", type=Path, required=True, help="val/test annotation (official JSON, JSONL or CSV)"
    )
    p.add_argument("--image-root", type=Path, default=None, help="folder image paths are relative to")
    p.add_argument("--config", default=None, help="model config name or JSON (default: the checkpoint's)")
    p.add_argument("--vocab", type=Path, default=None, help="bert-base-uncased vocab.txt (default: bundled)")
    p.add_argument("--k-test", type=int, default=128, help="ITC candidates re-ranked per query (default 128)")
    p.add_argument("--ks", default=None, help="comma-separated K values for the R@1-vs-K curve")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images / candidate pairs per forward (default 64)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N images (and their captions)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument(
        "--official-loader",
        action="store_true",
        help="load images as the official code does (EXIF orientation ignored; default: upright)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of R@1 against K here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=eval_command)


def _positive(name: str, value: int | None) -> None:

    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1")


def eval_command(args: argparse.Namespace) -> int:

    for name in ("--k-test", "--batch-size", "--limit", "--threads"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    ks = None
    if args.ks:
        try:
            ks = [int(k) for k in args.ks.split(",") if k.strip()]
        except ValueError as exc:
            raise UsageError(f"--ks must be comma-separated integers, not {args.ks!r}") from exc
        if not ks or min(ks) < 1:
            raise UsageError("--ks values must be >= 1")
    if not args.checkpoint.exists():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    if not args.data.exists():
        raise CLIError(f"annotation file not found: {args.data}")
    for target in (args.out, args.plot):
        if target is not None and not target.parent.is_dir():
            raise CLIError(f"output folder does not exist: {target.parent}")

    import torch

    from albef.model.checkpoint import CheckpointError
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.truth import load_truth
    from albef.model.factory import create_model
    from albef.model.text import AlbefTokenizer, default_vocab_path
    from albef.model.train.evaluate import evaluate, format_table, plot_r1_vs_k

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        eval_set = load_eval_set(args.data, args.image_root)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if args.limit:
        eval_set = eval_set.subset(args.limit)
    if not eval_set.images or not eval_set.texts:
        raise CLIError(f"{args.data}: no images or no captions to evaluate")
    try:
        tokenizer = AlbefTokenizer.from_vocab(args.vocab or default_vocab_path())
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from exc
    try:
        model = create_model(args.config, args.checkpoint).to(args.device)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CLIError(f"cannot load {args.checkpoint}: {exc}") from exc
    model.float()

    report = evaluate(
        model,
        eval_set,
        tokenizer,
        args.k_test,
        ks,
        args.batch_size,
        args.device,
        progress=not args.no_progress,
        exif_transpose=not args.official_loader,
        truth=load_truth(args.data, eval_set.images, eval_set.texts),
    )
    report["checkpoint"] = str(args.checkpoint)
    report["data"] = str(args.data)
    print(f"{args.data}: {report['n_images']} images, {report['n_texts']} texts")  # noqa: T201
    print(format_table(report))  # noqa: T201
    if args.out:
        _write_json(args.out, report)
        print(f"wrote {args.out}")  # noqa: T201
    if args.plot:
        plot_r1_vs_k(report, args.plot)
        print(f"wrote {args.plot}")  # noqa: T201
    return 0


def _write_json(path: Path, obj: object) -> None:
    from albef import atomic

    atomic.write_json(path, obj)
