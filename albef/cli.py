"""The `albef` console command.

Each group of subcommands lives beside the code it drives (``albef.model.cli``, ``albef.index.cli``, ...)
and exposes ``register(subparsers)``. Registration must stay import-light: heavy imports (torch, faiss,
onnxruntime) happen inside the handlers, so ``albef serve`` never loads torch and ``albef --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from albef import __version__
from albef.errors import CLIError, UsageError

__all__ = ["CLIError", "UsageError", "main", "build_parser"]

# Order is the order of `albef --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "albef.model.cli",
    "albef.model.data.cli",
    "albef.model.train.cli",
    "albef.model.train.eval_cli",
    "albef.model.export_cli",
    "albef.index.cli",
    "albef.service.cli",
    "albef.demo_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albef", description="ALBEF image-text retrieval")
    parser.add_argument("--version", action="version", version=f"albef-search {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _name_leaves(parser)
    return parser


def _name_leaves(parser: argparse.ArgumentParser) -> None:
    """Give every leaf subcommand its full name (``albef index info``) for its error messages."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(_command=parser.prog)
    for action in subs:
        for child in action.choices.values():
            _name_leaves(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from albef.log import setup_logging

    setup_logging()
    try:
        rc = args.func(args)
    except CLIError as exc:
        print(f"{getattr(args, '_command', 'albef')}: error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
