"""Publishing files and folders atomically: the one way the project writes anything a reader may open.

A file is written under a temporary name in the same folder, flushed and fsync'ed, renamed over the target
(``os.replace``, atomic on POSIX) and the folder fsync'ed, so a reader sees the old content or the new one and a
crash leaves at most a stray ``.NAME.*.tmp``, never half a file. A folder is built under a temporary name and
renamed into place the same way; an existing one is moved aside first and removed after. Torch-free, stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["fsync_dir", "publish_dir", "replace", "write_bytes", "write_json", "write_text", "writing"]


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where the OS does not allow it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def replace(tmp: str | Path, final: str | Path) -> None:
    """Publish a finished temporary file (e.g. written by a library's own save function) as ``final``."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[IO[bytes]]:
    """``with writing(path) as fh: ...``: a binary file that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with writing(path) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def publish_dir(tmp: str | Path, final: str | Path, *, replace_existing: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``final``. An existing ``final`` is an error unless
    ``replace_existing``: then it is moved aside, the new one renamed in, and the old one removed."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        if not replace_existing:
            raise FileExistsError(f"{final} exists")
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        final.rename(old)
        tmp.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    tmp.rename(final)
    fsync_dir(final.parent)
