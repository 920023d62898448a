"""``delete``: remove items by id into a new version.

Nothing is encoded and no segment is written: the new version's SQLite drops the rows, its FAISS indexes
drop the ids (or are rebuilt where the factory cannot remove), and the segments stay as they are (their dead
rows still count in ``bytes_per_item``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from albef.index import ann, layout, metadata
from albef.index.errors import IndexError_, IndexNotFoundError
from albef.index.options import KINDS, BuildOptions, Result
from albef.index.publish import VersionChange, publish_version


def delete(
    index_dir: str | Path,
    ids: Sequence[int],
    *,
    keep_versions: int | None = None,
    max_memory: str | None = None,
) -> Result:
    """Remove items by id into a new version. Unknown ids are refused (nothing changes)."""
    index_dir = Path(index_dir)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise IndexError_("no ids to delete")
    with layout.writer_lock(index_dir):
        layout.clean_stale_tmp(index_dir)
        base = layout.current_version(index_dir)
        if base is None:
            raise IndexNotFoundError(f"no index in {index_dir}")
        base_dir = layout.version_path(index_dir, base)
        manifest = layout.read_manifest(base_dir)
        kind_of = _known_kinds(base_dir, ids)
        t0 = time.perf_counter()
        version = layout.next_version(index_dir)
        tmp = layout.versions_dir(index_dir) / f".tmp-{version}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            conn = metadata.create(tmp / "meta.sqlite", base=base_dir / "meta.sqlite")
            metadata.delete(conn, ids)
            conn.commit()
            removed = {k: np.array([i for i in ids if kind_of[i] == k], dtype=np.int64) for k in KINDS}
            opts = BuildOptions(
                keep_versions=keep_versions or manifest.get("keep_versions") or BuildOptions.keep_versions,
                max_memory=max_memory or manifest.get("max_memory") or ann.DEFAULT_MAX_MEMORY,
            )
            report = {
                "operation": "delete",
                "deleted": {k: v.tolist() for k, v in removed.items()},
                "seconds": {},
            }
            change = VersionChange(
                index_dir,
                tmp,
                version,
                manifest,
                base_dir,
                "delete",
                segments=list(manifest["segments"]),
                next_id=int(manifest["next_id"]),
                removed=removed,
            )
            new_manifest = publish_version(change, conn, opts, report, t0=t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        layout.prune(index_dir, opts.keep_versions)
        return Result(version, index_dir, new_manifest, report)


def _known_kinds(base_dir: Path, ids: list[int]) -> dict[int, str]:
    """id -> kind of every id in ``ids``; IndexError_ naming the unknown ones (nothing is deleted then)."""
    conn = metadata.connect_readonly(base_dir / "meta.sqlite")
    try:
        found = metadata.existing_ids(conn, ids)
    finally:
        conn.close()
    unknown = [i for i in ids if i not in found]
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        raise IndexError_(f"unknown ids (nothing deleted): {shown}")
    return found
