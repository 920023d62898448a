"""``albef serve``: run the search service on uvicorn. Registration is import-light (no torch, ever)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from albef.errors import CLIError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the search REST service (FastAPI on uvicorn)",
        description="Serve an index over HTTP. Every option can also be set with an ALBEF_* "
        "environment variable (see albef/settings.py); flags win.",
    )
    p.add_argument("--index", type=Path, default=None, help="index folder (ALBEF_INDEX_DIR)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model bundle (ALBEF_BUNDLE; default: the bundle the index manifest records)",
    )
    p.add_argument("--variant", default=None, help="bundle variant, fp32 or int8 (ALBEF_VARIANT)")
    p.add_argument("--host", default=None, help="address to bind (ALBEF_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (ALBEF_PORT, default 8000)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (ALBEF_THREADS)")
    p.set_defaults(func=serve_command)


def _check(settings: object) -> None:
    """Fail fast, with one line, on what cannot work; a folder without a version yet is waited for."""

    index_dir = getattr(settings, "index_dir", None)
    if index_dir is None:
        raise UsageError("no index folder: pass --index or set ALBEF_INDEX_DIR")
    if not Path(index_dir).is_dir():
        raise CLIError(f"index folder not found: {index_dir}")
    from albef.index import current_version

    bundle = getattr(settings, "bundle", None)
    if bundle is not None:
        from albef.model.runtime import BundleError, read_manifest

        try:
            manifest = read_manifest(bundle)
        except BundleError as exc:
            raise CLIError(str(exc)) from exc
        if current_version(index_dir) is not None:
            from albef.index import layout
            from albef.index.errors import IndexMismatchError

            try:
                layout.check_bundle(
                    layout.read_manifest(layout.version_path(Path(index_dir))),
                    manifest.get("bundle_id"),
                    index_dir,
                )
            except IndexMismatchError as exc:
                raise CLIError(f"{exc} (--model {bundle})") from exc
    elif current_version(index_dir) is not None:
        from albef.service.state import bundle_path_for

        path = bundle_path_for(Path(index_dir), None)
        if not (path / "manifest.json").is_file():
            raise CLIError(f"the model bundle the index records ({path}) is not there; pass --model")


def _drop_colour(record: object) -> bool:
    """uvicorn adds an ANSI-coloured copy of its messages; our JSON logs keep only the plain one."""
    record.__dict__.pop("color_message", None)
    return True


def cli_settings(**overrides: object) -> Any:
    """The settings with the command line's overrides; an invalid value is a one-line CLI error."""
    from pydantic import ValidationError

    from albef.settings import get_settings

    try:
        return get_settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        raise UsageError(f"invalid setting {field}: {err.get('msg')}") from exc


def serve_command(args: argparse.Namespace) -> int:
    import logging

    settings = cli_settings(
        index_dir=args.index,
        bundle=args.model,
        variant=args.variant,
        host=args.host,
        port=args.port,
        threads=args.threads,
    )
    _check(settings)
    from albef.service import server
    from albef.service.app import create_app

    logging.getLogger().setLevel(settings.log_level)
    logging.getLogger("uvicorn.error").addFilter(_drop_colour)
    log = logging.getLogger("albef.service")

    def listening(url: str) -> None:
        # After the socket accepts connections; /readyz turns 200 once the bundle and index are loaded.
        log.info("listening", extra={"url": url})

    server.run(create_app(settings), host=settings.host, port=settings.port, on_listening=listening)
    return 0
