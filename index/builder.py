"""Index builds and changes: ``build``, ``add`` (encode sources, resumable) and ``delete``.

A build/add runs in three steps, one module each:

1. **Plan** (:mod:`albef.index.plan`, ``work/pending/plan.json``, written once): sources are read into an
   ordered list of images (unique by path) and texts (unique by cleaned caption, and not yet in the index),
   cut into shards of ``shard_size`` images / ``text_shard_size`` texts.
2. **Encode** (:mod:`albef.index.encode`): images are decoded ahead of the model by a thread pool, content
   duplicates dropped, and each finished shard committed atomically. After a crash (even kill -9),
   ``resume=True`` reloads the plan and continues with the first missing shard; a resumed build produces
   the same ids, vectors and metadata as an uninterrupted one.
3. **Publish** (:mod:`albef.index.publish`): ids are assigned in plan order (images, then texts), the shards
   are streamed into a new segment, SQLite and FAISS (:mod:`albef.index.ann_policy`) are updated into a new
   version folder, which is renamed into place before the ``current`` pointer moves. Old versions beyond
   ``keep_versions`` are pruned.

Step 2 is pluggable (:class:`~albef.index.options.ShardEncoder`): by default it runs in this process
(:func:`encode_locally`); ``encoder=RayEncoder(...)`` (:mod:`albef.index.ray_build`) runs it on a Ray cluster
and commits the same shards, so steps 1 and 3, resuming, and the result are the same.

``delete`` (:mod:`albef.index.delete`) publishes a new version the same way. The options, the encoder
protocol and the result live in :mod:`albef.index.options`; all are importable from here.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from albef.index import ann, layout, metadata
from albef.index.delete import delete
from albef.index.encode import encode_images, encode_texts, items_done
from albef.index.errors import IndexError_, IndexNotFoundError
from albef.index.options import KINDS, BuildOptions, Encoder, Result, ShardEncoder
from albef.index.plan import open_work
from albef.index.publish import publish_build

__all__ = [
    "KINDS",
    "BuildOptions",
    "Encoder",
    "Result",
    "ShardEncoder",
    "add",
    "build",
    "delete",
    "encode_locally",
]

log = logging.getLogger(__name__)


def build(
    index_dir: str | Path,
    bundle: Encoder,
    sources: Sequence[str | Path],
    options: BuildOptions | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    encoder: ShardEncoder | None = None,
) -> Result:
    """Build a new index in ``index_dir`` (which must not hold one yet) from ``sources``."""
    opts = options or BuildOptions()
    opts.max_memory = opts.max_memory or ann.DEFAULT_MAX_MEMORY
    opts.check()
    index_dir = Path(index_dir)
    if layout.current_version(index_dir) is not None:
        raise IndexError_(
            f"{index_dir} already holds an index (version {layout.current_version(index_dir)}); "
            "use `albef index add` to extend it"
        )
    with layout.writer_lock(index_dir):
        return _encode_and_publish(
            index_dir, bundle, sources, opts, base=None, resume=resume, restart=restart, encoder=encoder
        )


def add(
    index_dir: str | Path,
    bundle: Encoder,
    sources: Sequence[str | Path],
    options: BuildOptions | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    encoder: ShardEncoder | None = None,
) -> Result:
    """Encode ``sources`` into a new version of an existing index (content already indexed is skipped)."""
    opts = options or BuildOptions()
    index_dir = Path(index_dir)
    with layout.writer_lock(index_dir):
        base = layout.current_version(index_dir)
        if base is None:
            raise IndexNotFoundError(f"no index in {index_dir}; create one with `albef index build`")
        manifest = layout.read_manifest(layout.version_path(index_dir, base))
        layout.check_bundle(manifest, bundle.bundle_id, index_dir)
        # Feature layout is a property of the index: later segments follow the first one.
        opts.token_dtype = manifest["features"]["token_dtype"]
        opts.text_features = manifest["features"]["text_features"]
        # The budget the index was built under, unless this command names another.
        opts.max_memory = opts.max_memory or manifest.get("max_memory") or ann.DEFAULT_MAX_MEMORY
        opts.check()
        return _encode_and_publish(
            index_dir, bundle, sources, opts, base=base, resume=resume, restart=restart, encoder=encoder
        )


def _encode_and_publish(
    index_dir: Path,
    bundle: Encoder,
    sources: Sequence[str | Path],
    opts: BuildOptions,
    base: str | None,
    resume: bool,
    restart: bool,
    encoder: ShardEncoder | None = None,
) -> Result:
    from albef.progress import progress_bar

    t0 = time.perf_counter()
    index_dir.mkdir(parents=True, exist_ok=True)
    layout.clean_stale_tmp(index_dir)
    layout.gc_segments(index_dir)
    wdir, plan, resumed = open_work(index_dir, bundle, sources, opts, base, resume, restart)
    base_dir = layout.version_path(index_dir, base) if base is not None else None
    base_manifest = layout.read_manifest(base_dir) if base_dir is not None else None
    known: dict[str, int] = {}
    if base_dir is not None:
        conn = metadata.connect_readonly(base_dir / "meta.sqlite")
        try:
            known = metadata.shas(conn, "image")
        finally:
            conn.close()
    n_img, n_txt = len(plan["images"]), len(plan["texts"])
    done = items_done(wdir, plan, opts)
    log.info(
        "encoding",
        extra={
            "index": str(index_dir),
            "images": n_img,
            "texts": n_txt,
            "already_done": done,
            "resumed": resumed,
        },
    )
    t_enc = time.perf_counter()
    with progress_bar(
        total=n_img + n_txt,
        initial=done,
        unit="item",
        desc="encode",
        dynamic_ncols=True,
        enabled=opts.progress,
        smoothing=0.1,
    ) as bar:
        executor = (encoder or encode_locally)(wdir, plan, bundle, opts, known, bar)
    enc_s = time.perf_counter() - t_enc
    encoded_now = n_img + n_txt - done
    result = publish_build(
        index_dir,
        wdir,
        plan,
        bundle,
        opts,
        base_dir,
        base_manifest,
        t0=t0,
        timing={
            "encode_s": enc_s,
            "encoded_items": encoded_now,
            "resumed": resumed,
            "done_before": done,
            "executor": executor,
        },
    )
    shutil.rmtree(wdir, ignore_errors=True)
    layout.prune(index_dir, opts.keep_versions)
    return result


def encode_locally(
    wdir: Path, plan: dict[str, Any], bundle: Encoder, opts: BuildOptions, known: dict[str, int], bar: Any
) -> dict[str, Any]:
    """Step 2 in this process: images decoded by ``opts.workers`` threads, encoded by ``bundle``."""
    encode_images(wdir, plan, bundle, opts, known, bar)
    encode_texts(wdir, plan, bundle, opts, bar)
    return {"name": "local", "workers": opts.workers}
