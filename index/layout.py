"""On-disk layout of an index folder, the ``current`` pointer, atomic writes and the writer lock.

::

    INDEX_DIR/
      current                 "000003\\n": the version readers open (replaced with os.replace, never edited)
      versions/000003/        one immutable folder per change (build, add, delete)
        manifest.json         bundle id, counts, FAISS choice and recall, segments, bytes per item
        meta.sqlite           item metadata (id, kind, path, caption, size, sha256, user JSON, location)
        image.faiss           FAISS index of image embeddings (text->image search), ids = item ids
        text.faiss            FAISS index of text embeddings (image->text search)
        report.json           what the change did: counts, skipped/failed inputs, throughput
      segments/seg-000001/    immutable feature arrays written by one build/add, shared by later versions
      work/<op>/              shards of an unfinished build/add (``--resume`` continues from them)
      lock                    flock'ed by the one writer

A version folder is first written as ``versions/.tmp-000003-<pid>`` and renamed when complete; the pointer
moves afterwards. A reader therefore only ever sees complete versions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from albef import atomic
from albef.index.errors import IndexLockedError, IndexMismatchError, IndexNotFoundError

FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^\d{6}$")


def versions_dir(index_dir: Path) -> Path:
    return Path(index_dir) / "versions"


def segments_dir(index_dir: Path) -> Path:
    return Path(index_dir) / "segments"


def work_dir(index_dir: Path) -> Path:
    return Path(index_dir) / "work"


def version_name(number: int) -> str:
    return f"{number:06d}"


def current_version(index_dir: str | Path) -> str | None:
    """The version the ``current`` pointer names, or None. One small read: cheap enough to poll."""
    try:
        text = (Path(index_dir) / "current").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text if _VERSION_RE.match(text) else None


def list_versions(index_dir: Path) -> list[str]:
    vdir = versions_dir(index_dir)
    if not vdir.is_dir():
        return []
    return sorted(p.name for p in vdir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def next_version(index_dir: Path) -> str:
    existing = list_versions(index_dir)
    return version_name(int(existing[-1]) + 1 if existing else 1)


def version_path(index_dir: Path, version: str | None = None) -> Path:
    """Folder of ``version`` (default: current). Raises IndexNotFoundError."""
    index_dir = Path(index_dir)
    if version is None:
        version = current_version(index_dir)
        if version is None:
            raise IndexNotFoundError(f"no index in {index_dir} (no 'current' pointer)")
    if not _VERSION_RE.match(str(version)):
        raise IndexNotFoundError(f"bad version name {version!r} (expected 6 digits like 000003)")
    path = versions_dir(index_dir) / version
    if not (path / "manifest.json").is_file():
        raise IndexNotFoundError(f"version {version} not found in {index_dir}")
    return path


def read_manifest(version_dir: Path) -> dict[str, Any]:
    return json.loads((Path(version_dir) / "manifest.json").read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, sort_keys=True)


def set_current(index_dir: Path, version: str) -> None:
    """Move the pointer (an atomic replace of the small ``current`` file)."""
    atomic.write_text(Path(index_dir) / "current", version + "\n")


@contextlib.contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    """One writer at a time. flock is released by the kernel when the process dies (even kill -9)."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    fh = open(index_dir / "lock", "a+")  # noqa: SIM115 - held for the duration of the context
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IndexLockedError(f"another process is writing to {index_dir}") from exc
        yield
    finally:
        fh.close()


def clean_stale_tmp(index_dir: Path) -> None:
    """Remove half-written version/segment folders left by a crashed writer (only under the lock)."""
    for parent in (versions_dir(index_dir), segments_dir(index_dir)):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)


def prune(index_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one), then the segments that no
    remaining version uses. Readers holding an old version open keep working: unlinked files stay
    readable while mapped or open."""
    index_dir = Path(index_dir)
    keep = max(1, int(keep))
    versions = list_versions(index_dir)
    cur = current_version(index_dir)
    doomed = [v for v in versions[:-keep] if v != cur]
    for v in doomed:
        shutil.rmtree(versions_dir(index_dir) / v, ignore_errors=True)
    gc_segments(index_dir)
    return doomed


def gc_segments(index_dir: Path) -> list[str]:
    """Delete segment folders that no version references (e.g. left by a build that crashed while
    publishing). Only call it under the writer lock."""
    used: set[str] = set()
    for v in list_versions(index_dir):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            used.update(read_manifest(versions_dir(index_dir) / v).get("segments", []))
    removed = []
    sdir = segments_dir(index_dir)
    if sdir.is_dir():
        for p in sdir.iterdir():
            if p.is_dir() and not p.name.startswith(".tmp-") and p.name not in used:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def check_bundle(manifest: dict[str, Any], bundle_id: str | None, where: Path | str) -> None:
    """The one bundle-mismatch rule: an index version answers only to the bundle it was built with
    (embeddings of different models are not comparable). ``where`` names the index (and version) in the error."""
    built_with = str(manifest.get("bundle_id"))
    if bundle_id is not None and built_with != bundle_id:
        raise IndexMismatchError(
            f"index {where} was built with model bundle {built_with[:16]}..., not {bundle_id[:16]}... "
            "(embeddings of different models are not comparable): rebuild the index with this bundle, or use "
            "the one it was built with"
        )
