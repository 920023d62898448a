"""``albef demo``: prepare (or reuse) the demo's bundle, gallery and index, then serve them with the web page.

Registration is import-light; the handler imports the heavy parts only for the steps that must run.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from albef.errors import CLIError, UsageError

if TYPE_CHECKING:
    from albef.demo import DemoResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the tiny model over a synthetic gallery, indexed and served with a web page",
        description="Export the shipped tiny model, generate the synthetic gallery, index it and serve the search "
        "page at http://HOST:PORT/. Everything is cached (--cache, $ALBEF_DEMO_CACHE, default "
        "~/.cache/albef-search/demo) and reused while the checkpoint and library versions match. "
        "Service settings (e.g. ALBEF_API_KEY) come from the environment as for `albef serve`.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder for the bundle, gallery and index")
    p.add_argument("--no-serve", action="store_true", help="prepare the cache and exit")
    p.add_argument("--rebuild", action="store_true", help="rebuild every step even if the cache is valid")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="model checkpoint in our format (default: the shipped model/weights/albef-tiny-synth)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="scenes to generate (default: the tiny recipe's 3000; the gallery is the 10%% test split)",
    )
    p.set_defaults(func=demo_command)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # noqa: T201


def demo_command(args: argparse.Namespace) -> int:
    import logging
    import time

    from albef.demo import DEMO_SYNTH, DemoError, prepare
    from albef.settings import LogSettings

    # The numbered progress lines and tqdm bars are the demo's output; JSON info logs would drown them
    # (ALBEF_LOG_LEVEL=INFO brings them back).
    quiet = LogSettings().log_level is None
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    synth = dict(DEMO_SYNTH)
    if args.images is not None:
        if args.images < 20:
            raise UsageError("--images must be at least 20 (the test split is 10% of the scenes)")
        synth["images"] = args.images
    sock = None
    if not args.no_serve:
        # Bind first: a port in use is reported before minutes of work, not after.
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            sock.close()
            raise CLIError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass another --port"
            ) from exc
    t0 = time.perf_counter()
    try:
        result = prepare(args.cache, checkpoint=args.checkpoint, synth=synth, force=args.rebuild, say=_say)
    except (DemoError, FileExistsError, ValueError) as exc:
        if sock is not None:
            sock.close()
        raise CLIError(str(exc)) from exc
    except ModuleNotFoundError as exc:
        # A serving-only install can run a cached demo, but not build one: export needs torch.
        if sock is not None:
            sock.close()
        raise CLIError(
            f"building the demo needs the train extra ({exc.name} is not installed): "
            "pip install 'albef-search[train]'"
        ) from exc
    steps = ", ".join(f"{name} {sec:.1f} s" for name, sec in result.seconds.items())
    _say(f"ready in {time.perf_counter() - t0:.1f} s ({steps}; cache: {result.cache_dir})")
    if args.no_serve:
        _say(f"serve it with: albef serve --index {result.index} --model {result.bundle}")
        return 0
    assert sock is not None
    return _serve(result, args.host, sock, quiet)


def _serve(result: DemoResult, host: str, sock: socket.socket, quiet: bool) -> int:
    import logging

    from albef.service import server
    from albef.service.app import create_app
    from albef.service.cli import cli_settings

    port = sock.getsockname()[1]
    settings = cli_settings(index_dir=result.index, bundle=result.bundle, host=host, port=port)

    def listening(url: str) -> None:
        # Only now does the socket accept connections (see albef.service.server).
        _say(f"4/4 serving the search page at {url}  (Ctrl+C to stop)")
        if settings.api_key is not None:
            _say("    ALBEF_API_KEY is set: enter the key in the page's 'API key' field")

    logging.getLogger().setLevel(logging.WARNING if quiet else settings.log_level)
    try:
        server.run(create_app(settings), sock=sock, on_listening=listening, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled; stopping the demo is a normal exit
        pass
    _say("stopped")
    return 0
