"""Build sources -> a deterministic list of records (image path and/or captions, user metadata).

The formats (folders with ``.txt`` captions, the official ALBEF JSON, JSONL, CSV, TSV, caption files, single
images), their column names and how image paths resolve are those of :mod:`albef.model.data.formats`, the
reader training uses too. An index build reads them under its ``strict`` policy: a bad row stops the build
with a :class:`SourceError` naming the file and row, before anything is encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from albef.index.errors import SourceError
from albef.model.data import formats


@dataclass
class Record:
    image: str | None  # absolute local path, or a URI ("http://...", recorded as unreadable at build)
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    source: str = ""


def read_sources(sources: Iterable[str | Path], image_root: str | Path | None = None) -> Iterator[Record]:
    for src in sources:
        yield from read_source(Path(src), image_root)


def read_source(path: Path, image_root: str | Path | None = None) -> Iterator[Record]:
    try:
        for row in formats.read_source(path, image_root, "strict"):
            yield _record(row)
    except formats.FormatError as exc:
        raise SourceError(str(exc)) from exc


def _record(row: formats.Row) -> Record:
    meta = row.metadata
    # The official train files carry "image_id" (e.g. "coco_328757"): keep it as metadata.
    if row.image_id is not None:
        meta = {**(meta or {}), "image_id": row.image_id}
    return Record(row.image, row.captions, meta, row.source)
