"""Item metadata in SQLite: one ``items`` row per indexed image or text.

Columns: id (int64, unique across both kinds), kind ('image'|'text'), path (absolute local path or URI of
the image; for a text, the image it captions if any), caption, width, height (the image's size as seen: after its EXIF orientation, unless built with the
official loader),
sha256 (image bytes, or the cleaned caption for texts; unique per kind, so content is indexed once),
metadata (user JSON), image_id (text -> the image it was paired with), source (the build source), and
segment/row: where the item's vectors and re-rank features live.

Each version holds its own copy (made with SQLite's backup API), so published versions are never
modified and readers open them read-only and immutable (no locking, no journal).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from albef.index import filters

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id        INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    path      TEXT,
    caption   TEXT,
    width     INTEGER,
    height    INTEGER,
    sha256    TEXT NOT NULL,
    metadata  TEXT,
    image_id  INTEGER,
    source    TEXT,
    segment   TEXT NOT NULL,
    row       INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS items_kind_sha ON items (kind, sha256);
CREATE INDEX IF NOT EXISTS items_kind_id ON items (kind, id);
"""

COLUMNS = (
    "id",
    "kind",
    "path",
    "caption",
    "width",
    "height",
    "sha256",
    "metadata",
    "image_id",
    "source",
    "segment",
    "row",
)
PUBLIC = ("id", "kind", "path", "caption", "width", "height", "sha256", "metadata", "image_id", "source")


def create(path: Path, base: Path | None = None) -> sqlite3.Connection:
    """A writable database at ``path``: a copy of ``base`` (previous version) or a new empty one."""
    conn = sqlite3.connect(str(path))
    if base is not None:
        src = connect_readonly(base)
        try:
            src.backup(conn)
        finally:
            src.close()
    conn.executescript(SCHEMA)
    conn.commit()
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open a published (immutable) database; safe to share across threads behind a lock. It has the SQL
    function that filters with date ranges call (:data:`albef.index.filters.TIME_FUNCTION`)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.create_function(filters.TIME_FUNCTION, 1, filters.parse_time, deterministic=True)
    return conn


def insert(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    sql = f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    data = []
    for r in rows:
        meta = r.get("metadata")
        data.append(
            tuple(
                (json.dumps(meta, sort_keys=True) if meta is not None else None)
                if c == "metadata"
                else r.get(c)
                for c in COLUMNS
            )
        )
    conn.executemany(sql, data)
    return len(data)


def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    cur = conn.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])
    return cur.rowcount


def shas(conn: sqlite3.Connection, kind: str) -> dict[str, int]:
    """sha256 -> id of every item of ``kind`` (for de-duplication against what is indexed)."""
    return {sha: int(i) for sha, i in conn.execute("SELECT sha256, id FROM items WHERE kind = ?", (kind,))}


def existing_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in _chunks([int(i) for i in ids], 900):
        q = f"SELECT id, kind FROM items WHERE id IN ({', '.join('?' * len(chunk))})"
        out.update({int(i): k for i, k in conn.execute(q, chunk)})
    return out


def count(conn: sqlite3.Connection, kind: str) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM items WHERE kind = ?", (kind,)).fetchone()[0])


def locations(conn: sqlite3.Connection, kind: str, ids: Sequence[int]) -> dict[int, tuple[str, int]]:
    """id -> (segment, row) for the ids of ``kind`` that exist."""
    out: dict[int, tuple[str, int]] = {}
    for chunk in _chunks([int(i) for i in ids], 900):
        q = f"SELECT id, segment, row FROM items WHERE kind = ? AND id IN ({', '.join('?' * len(chunk))})"
        out.update({int(i): (s, int(r)) for i, s, r in conn.execute(q, [kind, *chunk])})
    return out


def all_locations(conn: sqlite3.Connection, kind: str) -> list[tuple[int, str, int]]:
    """(id, segment, row) of every item of ``kind``, in id order."""
    q = "SELECT id, segment, row FROM items WHERE kind = ? ORDER BY id"
    return [(int(i), s, int(r)) for i, s, r in conn.execute(q, (kind,))]


def matching(conn: sqlite3.Connection, kind: str, flt: filters.Filter) -> list[tuple[int, str, int]]:
    """(id, segment, row) of every item of ``kind`` that ``flt`` holds for, in id order (the connection must
    come from :func:`connect_readonly`)."""
    where, params = filters.to_sql(flt)
    q = f"SELECT id, segment, row FROM items WHERE kind = ? AND {where} ORDER BY id"
    return [(int(i), s, int(r)) for i, s, r in conn.execute(q, [kind, *params])]


def items(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for chunk in _chunks([int(i) for i in ids], 900):
        q = f"SELECT {', '.join(PUBLIC)} FROM items WHERE id IN ({', '.join('?' * len(chunk))})"
        for row in conn.execute(q, chunk):
            item = dict(zip(PUBLIC, row, strict=True))
            item["metadata"] = json.loads(item["metadata"]) if item["metadata"] is not None else None
            out[int(item["id"])] = item
    return out


def _chunks(seq: list[int], n: int) -> Iterable[list[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
