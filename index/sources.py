"""Build sources -> a deterministic list of records (image path and/or captions, user metadata).

Accepted sources (detected by what the path is):

- a folder: every image below it (recursive, sorted by relative path); a same-name ``.txt`` beside an
  image holds its captions, one per non-empty line;
- ``*.json``: the official ALBEF annotation files (docs/model.md §4.5): a list of ``{"image", "caption", "image_id"}``
  (train format, one entry per caption) or ``{"image", "caption": [...]}`` (val/test format); image paths
  are relative to ``image_root`` (default: the JSON file's folder);
- ``*.jsonl`` / ``*.csv`` / ``*.tsv``: one row per item with an image column (``image``, ``path``,
  ``image_path``, ``filepath`` or ``file``) and/or a caption column (``caption``, ``text``, ``captions``), and
  an optional ``metadata`` column (a JSON object; in CSV a JSON string). Relative paths: as for JSON;
- ``*.txt``: captions, one per line (text-only items);
- a single image file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from albef.index.errors import SourceError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
IMAGE_KEYS = ("image", "path", "image_path", "filepath", "file", "url", "uri")
CAPTION_KEYS = ("caption", "text", "captions")


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
    if not path.exists():
        raise SourceError(f"source not found: {path}")
    path = path.resolve()
    if path.is_dir():
        yield from _folder(path)
        return
    suffix = path.suffix.lower()
    root = Path(image_root) if image_root is not None else path.parent
    if suffix == ".json":
        yield from _annotation_json(path, root)
    elif suffix == ".jsonl":
        yield from _jsonl(path, root)
    elif suffix in (".csv", ".tsv"):
        yield from _csv(path, root, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".txt":
        yield from _caption_lines(path)
    elif suffix in IMAGE_EXTS:
        yield Record(str(path.resolve()), _sidecar_captions(path), None, str(path))
    else:
        raise SourceError(f"unknown source type: {path} (expected a folder, .json, .jsonl, .csv, .tsv, .txt "
                          "or an image file)")


def _folder(folder: Path) -> Iterator[Record]:
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    for p in files:
        yield Record(str(p.resolve()), _sidecar_captions(p), None, str(folder))


def _sidecar_captions(image: Path) -> list[str]:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return []
    try:
        text = txt.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resolve(value: Any, root: Path, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(f"{where}: image must be a string path, got {type(value).__name__}")
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        return value
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else root / p).resolve())


def _captions(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c for c in value if c.strip()]
    raise SourceError(f"{where}: caption must be a string or a list of strings")


def _metadata(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: metadata is not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise SourceError(f"{where}: metadata must be a JSON object")
    return value


def _row(obj: dict[str, Any], root: Path, where: str, source: str) -> Record:
    image_key = next((k for k in IMAGE_KEYS if k in obj), None)
    cap_key = next((k for k in CAPTION_KEYS if k in obj), None)
    if image_key is None and cap_key is None:
        raise SourceError(f"{where}: needs an image column ({', '.join(IMAGE_KEYS)}) or a caption column "
                          f"({', '.join(CAPTION_KEYS)}); has {sorted(obj)}")
    image = _resolve(obj.get(image_key), root, where) if image_key else None
    caps = _captions(obj.get(cap_key), where) if cap_key else []
    meta = _metadata(obj.get("metadata"), where)
    # The official train files carry "image_id" (e.g. "coco_328757"): keep it as metadata.
    if "image_id" in obj and obj["image_id"] not in (None, ""):
        meta = {**(meta or {}), "image_id": obj["image_id"]}
    if image is None and not caps:
        raise SourceError(f"{where}: row has neither an image nor a caption")
    return Record(image, caps, meta, source)


def _annotation_json(path: Path, root: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a list of {{'image', 'caption'}} entries (ALBEF annotation format)")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise SourceError(f"{path}[{i}]: expected an object, got {type(obj).__name__}")
        yield _row(obj, root, f"{path}[{i}]", str(path))


def _jsonl(path: Path, root: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise SourceError(f"{path}:{lineno}: expected a JSON object")
            yield _row(obj, root, f"{path}:{lineno}", str(path))


def _csv(path: Path, root: Path, delimiter: str) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise SourceError(f"{path}: empty file or no header row")
        for lineno, row in enumerate(reader, 2):
            clean = {k.strip().lower(): (v if v is None else v.strip()) for k, v in row.items() if k}
            yield _row(clean, root, f"{path}:{lineno}", str(path))


def _caption_lines(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                yield Record(None, [line.strip()], None, str(path))
