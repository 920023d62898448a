"""``albef train --config FILE [--resume] [--out DIR] [--final DIR] [key.path=value ...]``.

Runs unchanged as one CPU process or under ``torchrun --nproc_per_node=N -m albef.cli train ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from albef.errors import CLIError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune ALBEF (ITC + ITM [+ MLM]) from a YAML recipe",
        description="Train ALBEF from a YAML recipe (see model/train/recipes/). Overrides are key.path=value "
        "pairs parsed as YAML, e.g. train.batch_size=8 optim.lr=3e-4.",
    )
    p.add_argument("--config", required=True, help="recipe YAML (a path, or the name of a built-in recipe)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--final", type=Path, default=None, help="where to write the final weights (default OUT/final)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.set_defaults(func=train_command)


def recipe_path(name: str) -> Path:
    """A path as given, else a built-in recipe name (``tiny-synth``)."""
    p = Path(name)
    if p.is_file():
        return p
    builtin = Path(__file__).parent / "recipes" / f"{name.removesuffix('.yaml')}.yaml"
    return builtin if builtin.is_file() else p


def train_command(args: argparse.Namespace) -> int:
    from albef.model.train.settings import ConfigError, load_config

    path = recipe_path(args.config)
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    out = args.out or Path("runs") / path.stem
    from albef.model.checkpoint import CheckpointError
    from albef.model.train.trainer import Trainer

    try:
        summary = Trainer(
            cfg, out, resume=args.resume, final_dir=args.final, progress=not args.no_progress
        ).run()
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        raise CLIError(str(exc)) from exc
    from albef.model.train.momentum import rank

    if rank() == 0:
        print(json.dumps(summary, indent=2))  # noqa: T201
    return 0
