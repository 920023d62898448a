"""``albef index build|add|delete|info``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from albef.errors import CLIError, UsageError

# The same list as albef.model.image.DEFAULT_FORMATS (not imported here: registration stays import-light;
# tests/albef/test_conventions.py checks that the two agree).
FORMATS_HELP = "JPEG,PNG,WEBP,GIF,BMP,TIFF"


class _FromSettings:
    """The default of an option that ``albef.settings.IndexBuildSettings`` holds: ``ALBEF_INDEX_<NAME>`` if
    set, else the field's declared default, filled in when the command runs (:func:`_apply_settings`).

    A marker rather than the value because registration stays import-light: pydantic (and, for the ANN
    policy's figures, faiss) is imported only when ``--help`` renders ``%(default)s``."""

    def __init__(self, name: str, shown: Callable[[], object] | None = None) -> None:
        self.name = name
        self.shown = shown

    def __str__(self) -> str:
        if self.shown is not None:
            return str(self.shown())
        from albef.settings import INDEX_BUILD_DEFAULTS

        return str(getattr(INDEX_BUILD_DEFAULTS, self.name))


def _ann_default(name: str) -> Callable[[], object]:
    def shown() -> object:
        from albef.index import ann

        return getattr(ann, name)

    return shown


def _apply_settings(args: argparse.Namespace) -> None:
    """Options left at their default take ``ALBEF_INDEX_*`` (or the declared default); flags win."""
    from pydantic import ValidationError

    from albef.settings import IndexBuildSettings

    names = [n for n in IndexBuildSettings.model_fields if hasattr(args, n)]
    given = {n: getattr(args, n) for n in names if not isinstance(getattr(args, n), _FromSettings)}
    try:
        settings = IndexBuildSettings(**given)
    except ValidationError as exc:  # only the environment can be wrong here: flags are typed by argparse
        err = exc.errors()[0]
        field = "".join(str(x) for x in err.get("loc", ())[:1])
        raise UsageError(f"invalid setting ALBEF_INDEX_{field.upper()}: {err.get('msg')}") from exc
    for n in names:
        if isinstance(getattr(args, n), _FromSettings):
            setattr(args, n, getattr(settings, n))


def _encode_options(p: argparse.ArgumentParser, *, layout_options: bool) -> None:
    p.epilog = (
        "The defaults of --threads, --batch-size, --text-batch-size, --shard-size, --text-shard-size, "
        "--workers, --max-memory, --flat-below, --target-recall and --keep-versions can be set in the "
        "environment as ALBEF_INDEX_<OPTION> (e.g. ALBEF_INDEX_BATCH_SIZE=32); a flag wins."
    )
    g = p.add_argument_group("encoding")
    g.add_argument("--variant", default="fp32", help="bundle variant to encode with (fp32, int8, ...)")
    g.add_argument(
        "--threads",
        type=int,
        default=_FromSettings("threads", lambda: "all"),
        help="ONNX Runtime intra-op threads (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=_FromSettings("batch_size"),
        help="images per encoder call (default %(default)s)",
    )
    g.add_argument(
        "--text-batch-size",
        type=int,
        default=_FromSettings("text_batch_size"),
        help="texts per encoder call (default %(default)s)",
    )
    g.add_argument(
        "--shard-size",
        type=int,
        default=_FromSettings("shard_size"),
        help="images per committed shard (default %(default)s)",
    )
    g.add_argument(
        "--text-shard-size",
        type=int,
        default=_FromSettings("text_shard_size"),
        help="texts per committed shard (default %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=_FromSettings("workers"),
        help="image reading/decoding threads (default %(default)s)",
    )
    g.add_argument(
        "--official-loader",
        action="store_true",
        help="decode images as the official ALBEF loader does: EXIF orientation ignored (for "
        "benchmark parity; by default photos are turned upright by their EXIF orientation)",
    )
    g.add_argument(
        "--image-formats",
        default=None,
        help=f"image formats to decode, comma-separated; other files are reported and skipped "
        f"(default {FORMATS_HELP})",
    )
    g.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder that relative image paths in JSON/CSV/JSONL sources are resolved against "
        "(default: the source file's folder)",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none is drawn without a terminal)"
    )
    g.add_argument("--json", action="store_true", help="print the result as one JSON object (for scripts)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted build/add")
    g.add_argument("--restart", action="store_true", help="discard an interrupted build/add and start over")
    g = p.add_argument_group("cluster (the cluster extra: pip install 'albef-search[cluster]')")
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="decode and encode on a Ray cluster: auto (the running cluster), HOST:PORT of its head, or "
        "local (a Ray instance of this machine). Plan, FAISS, SQLite and the publish stay here; the result "
        "and the shards (--resume) are a local build's. Nodes need the bundle and the images at the same paths",
    )
    g.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="encoder actors, each holding one ONNX Runtime session per encoder (default: one per --threads "
        "CPUs of the cluster, one CPU left to decoding; with --ray-gpus, one per GPU share)",
    )
    g.add_argument(
        "--ray-gpus",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per encoder actor; > 0 runs the encoders with ONNX Runtime's CUDA execution provider "
        "where it is installed (default 0: CPU)",
    )
    g = p.add_argument_group("index")
    if layout_options:
        g.add_argument(
            "--token-dtype",
            choices=("fp16", "int8"),
            default="fp16",
            help="storage of image token features for ITM re-ranking (default fp16)",
        )
        g.add_argument(
            "--text-features",
            choices=("tokens", "ids"),
            default="tokens",
            help="store text token features (fast re-rank) or only token ids (small; re-encoded "
            "at query time). Default tokens",
        )
    g.add_argument(
        "--factory",
        default=None,
        help='FAISS factory string, e.g. "IVF256,PQ32" or "HNSW32" (default: chosen under --max-memory)',
    )
    g.add_argument(
        "--max-memory",
        default=_FromSettings("max_memory", _ann_default("DEFAULT_MAX_MEMORY")),
        help="memory budget of each FAISS index (default: for add, the budget the index was built "
        "under; for build, %(default)s)",
    )
    g.add_argument(
        "--flat-below",
        type=int,
        default=_FromSettings("flat_below", _ann_default("FLAT_BELOW")),
        help="exact search below this many vectors (default %(default)s)",
    )
    g.add_argument(
        "--target-recall",
        type=float,
        default=_FromSettings("target_recall"),
        help="ANN recall@10 the search settings aim for (default %(default)s)",
    )
    g.add_argument(
        "--keep-versions",
        type=int,
        default=_FromSettings("keep_versions"),
        help="index versions to keep (default %(default)s)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser("index", help="build and change retrieval indexes (FAISS + SQLite)")
    isub = top.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True

    p = isub.add_parser("build", help="encode sources with a model bundle into a new index")
    p.add_argument(
        "sources",
        nargs="+",
        type=Path,
        help="image folders (with optional same-name .txt captions), ALBEF annotation .json, "
        ".csv/.tsv/.jsonl of image paths and/or captions, .txt of captions (one per line)",
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle folder (from `albef export`)")
    p.add_argument("--out", required=True, type=Path, help="index folder to create")
    _encode_options(p, layout_options=True)
    p.set_defaults(func=build_command)

    p = isub.add_parser("add", help="encode more sources into a new version of an index")
    p.add_argument("sources", nargs="+", type=Path)
    p.add_argument("--index", required=True, type=Path, help="index folder")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model bundle folder (default: the bundle the index was built with)",
    )
    _encode_options(p, layout_options=False)
    p.set_defaults(func=add_command)

    p = isub.add_parser("delete", help="remove items by id (writes a new version)")
    p.add_argument("--index", required=True, type=Path, help="index folder")
    p.add_argument("--ids", required=True, help="comma-separated item ids, e.g. 1,2,3")
    p.add_argument("--keep-versions", type=int, default=None, help="index versions to keep")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (for scripts)")
    p.set_defaults(func=delete_command)

    p = isub.add_parser("info", help="show an index version: counts, model bundle, FAISS type, recall, sizes")
    p.add_argument("index_dir", type=Path)
    p.add_argument(
        "--at", metavar="VERSION", default=None, help="version to show, e.g. 000002 (default: current)"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=info_command)


def _options(args: argparse.Namespace) -> Any:
    from albef.index.builder import BuildOptions
    from albef.model.image import DEFAULT_FORMATS, parse_formats

    # flat_below None (neither flag nor variable): BuildOptions' default, the ANN policy's
    ann = {"flat_below": args.flat_below} if args.flat_below is not None else {}
    return BuildOptions(
        batch_size=args.batch_size,
        text_batch_size=args.text_batch_size,
        shard_size=args.shard_size,
        text_shard_size=args.text_shard_size,
        workers=args.workers,
        token_dtype=getattr(args, "token_dtype", "fp16"),
        text_features=getattr(args, "text_features", "tokens"),
        factory=args.factory,
        max_memory=args.max_memory,
        **ann,
        target_recall=args.target_recall,
        keep_versions=args.keep_versions,
        image_root=str(args.image_root.resolve()) if args.image_root else None,
        progress=not args.no_progress,
        exif_transpose=not args.official_loader,
        image_formats=parse_formats(args.image_formats) if args.image_formats else DEFAULT_FORMATS,
    )


def _load_bundle(path: Path, args: argparse.Namespace) -> Any:
    from albef.model.runtime import Bundle, BundleError

    try:
        return Bundle.load(path, variant=args.variant, intra_op_threads=args.threads)
    except BundleError as exc:
        raise CLIError(str(exc)) from exc


def _run(fn: Any, *a: Any, **kw: Any) -> Any:
    from albef.index.errors import IndexError_

    try:
        return fn(*a, **kw)
    except IndexError_ as exc:
        raise CLIError(str(exc)) from exc
    except ValueError as exc:  # bad option values (sizes, factory strings)
        raise UsageError(str(exc)) from exc


def _result_json(result: Any, **extra: Any) -> str:
    """What a script needs from build/add/delete: the new version, the counts, this run's report."""
    m = result.manifest
    return json.dumps(
        {
            "index": str(Path(result.index_dir).resolve()),
            "version": result.version,
            "counts": m["counts"],
            "bundle_id": m["bundle_id"],
            **extra,
            "report": result.report,
            "ann": {k: {f: m["ann"][k].get(f) for f in ("factory", "recall_at_k")} for k in m["ann"]},
        },
        default=str,
    )


def _print_result(result: Any, as_json: bool, **extra: Any) -> None:
    print(_result_json(result, **extra) if as_json else _summary(result))  # noqa: T201


def _summary(result: Any) -> str:
    rep = result.report
    m = result.manifest
    parts = [f"version {result.version}: {m['counts']['image']} images, {m['counts']['text']} texts"]
    if "images" in rep:
        i, t = rep["images"], rep["texts"]
        parts.append(
            f"this run indexed {i['indexed']} images ({i['failed']} failed, {i['duplicates']} duplicates) "
            f"and {t['indexed']} texts ({t['skipped']} skipped)"
        )
        if rep["throughput"]["items_per_s"]:
            parts.append(f"{rep['throughput']['items_per_s']} items/s")
    for kind in ("image", "text"):
        a = m["ann"][kind]
        if a.get("factory"):
            parts.append(f"{kind} index {a['factory']} recall@10 {a['recall_at_k']}")
    return (
        "; ".join(parts) + f"\nreport: {Path(result.index_dir) / 'versions' / result.version / 'report.json'}"
    )


def _encoder(args: argparse.Namespace) -> Any:
    """None (encode here), or the Ray encoder that ``--ray`` asks for."""
    if args.ray is None:
        if args.ray_actors is not None or args.ray_gpus:
            raise UsageError("--ray-actors and --ray-gpus need --ray ADDRESS")
        return None
    from albef.index.ray_build import RayEncoder, RayOptions

    threads = args.threads if isinstance(args.threads, int) else 1  # "all": one per actor, not all per actor
    encoder = _run(
        RayEncoder,
        RayOptions(address=args.ray, actors=args.ray_actors, threads=threads, gpus_per_actor=args.ray_gpus),
    )
    _run(encoder.connect)  # an unreachable cluster is reported before the index is touched
    return encoder


def build_command(args: argparse.Namespace) -> int:
    from albef.index import builder

    if args.resume and args.restart:
        raise UsageError("--resume and --restart exclude each other")
    _apply_settings(args)
    encoder = _encoder(args)
    bundle = _load_bundle(args.model, args)
    opts = _run(_options, args)
    result = _run(
        builder.build,
        args.out,
        bundle,
        args.sources,
        opts,
        resume=args.resume,
        restart=args.restart,
        encoder=encoder,
    )
    _print_result(result, args.json)
    return 0


def add_command(args: argparse.Namespace) -> int:
    from albef.index import builder, layout

    if args.resume and args.restart:
        raise UsageError("--resume and --restart exclude each other")
    _apply_settings(args)
    encoder = _encoder(args)
    model = args.model
    if model is None:
        try:
            manifest = layout.read_manifest(layout.version_path(args.index))
        except Exception as exc:
            raise CLIError(f"no index in {args.index}: {exc}") from exc
        model = Path(manifest["bundle"].get("path") or "")
        if not model.is_dir():
            raise CLIError(f"the index's model bundle {model} is gone; pass --model")
    bundle = _load_bundle(model, args)
    opts = _run(_options, args)
    result = _run(
        builder.add,
        args.index,
        bundle,
        args.sources,
        opts,
        resume=args.resume,
        restart=args.restart,
        encoder=encoder,
    )
    _print_result(result, args.json)
    return 0


def delete_command(args: argparse.Namespace) -> int:
    from albef.index import builder

    try:
        ids = [int(x) for x in args.ids.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise UsageError(f"--ids must be comma-separated integers, got {args.ids!r}") from exc
    if not ids:
        raise UsageError("--ids is empty")
    result = _run(builder.delete, args.index, ids, keep_versions=args.keep_versions)
    m = result.manifest
    if args.json:
        print(_result_json(result, deleted=len(set(ids))))  # noqa: T201
        return 0
    print(  # noqa: T201
        f"version {result.version}: deleted {len(set(ids))} items; "
        f"{m['counts']['image']} images, {m['counts']['text']} texts remain"
    )
    return 0


def info_command(args: argparse.Namespace) -> int:
    from albef.index import layout

    try:
        vdir = layout.version_path(args.index_dir, args.at)
    except Exception as exc:
        raise CLIError(str(exc)) from exc
    manifest = layout.read_manifest(vdir)
    if args.json:
        print(json.dumps(manifest, indent=2))  # noqa: T201
        return 0
    b = manifest["bundle"]
    lines = [
        f"index        {Path(args.index_dir).resolve()}",
        f"version      {manifest['version']} ({manifest['operation']}, {manifest['created']}); "
        f"current {layout.current_version(args.index_dir)}; versions {', '.join(layout.list_versions(args.index_dir))}",
        f"bundle       {manifest['bundle_id'][:16]}... {b.get('name') or ''} (embed {b['embed_dim']}, "
        f"image tokens {b['image_tokens_shape']}, text width {b['text_width']})",
        f"items        {manifest['counts']['image']} images, {manifest['counts']['text']} texts "
        f"(next id {manifest['next_id']})",
        f"features     image tokens {manifest['features']['token_dtype']}, texts {manifest['features']['text_features']}",
    ]
    for kind in ("image", "text"):
        a = manifest["ann"][kind]
        if not a.get("factory"):
            lines.append(f"{kind:<5} index  empty")
            continue
        lines.append(
            f"{kind:<5} index  {a['factory']} ({a['reason']}); params {a['params']}; "
            f"recall@{a['k']} {a['recall_at_k']} on {a.get('n_queries')} {a.get('query_source')} queries; "
            f"{a['query_ms']} ms/query; {a['file_bytes']:,} bytes"
        )
        bpi = manifest["bytes_per_item"][kind]
        lines.append(
            f"{kind:<5} bytes  {bpi['total']:,} per item ("
            + ", ".join(f"{k} {v:,}" for k, v in bpi.items() if k != "total")
            + ")"
        )
    print("\n".join(lines))  # noqa: T201
    return 0
