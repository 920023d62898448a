"""Image-caption input formats, read once for the index builder and for training. Torch-free.

A source is detected by what the path is:

- a folder: every image below it (recursive, sorted by relative path); a same-name ``.txt`` beside an
  image holds its captions, one per non-empty line, and a same-name ``.json`` its metadata (a JSON object,
  e.g. ``photo.json`` for ``photo.jpg``);
- ``*.json``: the official ALBEF annotation files (docs/model.md §4.5): a list of ``{"image", "caption",
  "image_id"}`` (train format, one entry per caption) or ``{"image", "caption": [...]}`` (val/test format),
  or an object whose ``annotations`` is such a list;
- ``*.jsonl`` / ``*.csv`` / ``*.tsv``: one row per item with an image column (:data:`IMAGE_KEYS`, the first
  one present wins) and/or a caption column (:data:`CAPTION_KEYS`), an optional ``image_id`` and an optional
  ``metadata`` column (a JSON object; in CSV/TSV a JSON string). CSV/TSV column names are matched
  case-insensitively and cells are stripped;
- ``*.txt``: captions, one per non-empty line (no images);
- a single image file (captions from its same-name ``.txt``, metadata from its same-name ``.json``, as in a
  folder).

Relative image paths resolve against ``image_root`` when given, else against the source file's folder;
``~`` is expanded, ``file://`` is stripped, other URIs (``http://...``) are kept as written.

What a bad row is does not depend on the caller; what happens to it does (:data:`Policy`): ``strict`` raises
:class:`FormatError` ``"file:row: error"``, ``skip`` records a :class:`Problem` and goes on. A source that
cannot be read at all (missing, unknown suffix, not valid JSON, not UTF-8, no usable header) raises
:class:`FormatError` under both. Rows are located as ``file:[i]`` (0-based entry of a JSON list),
``file:N`` (1-based line of JSONL, CSV/TSV or a caption file, as an editor shows it; for CSV the line the
row ends on) and, for captions beside an image, ``file.txt:N`` (``:0`` when the file cannot be read); a bad
metadata file beside an image is ``file.json:N`` (the line of the JSON error; ``:0`` when the file cannot be
read or holds no object). Such an image is bad as a whole (``skip`` leaves it out).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Policy = Literal["strict", "skip"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
IMAGE_KEYS = ("image", "path", "image_path", "filepath", "file", "url", "uri")
CAPTION_KEYS = ("caption", "text", "captions")
SOURCE_KINDS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "captions"}


class FormatError(ValueError):
    """A source cannot be read, or (``strict``) one of its rows is bad."""


@dataclass(frozen=True)
class Problem:
    """A bad row, skipped under the ``skip`` policy."""

    where: str  # "file:row"
    error: str
    path: str | None = None  # the row's image, when it names one

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.where, "path": self.path, "error": self.error}


@dataclass
class Row:
    """One item of a source: an image and/or its captions."""

    kind: Literal["row", "image", "caption"]  # a table/annotation row, an image found on disk, a caption line
    image: str | None  # absolute resolved path, or a URI as written
    captions: list[str]  # non-empty captions, as written (table cells stripped)
    caption_where: list[str]  # "file:row" of each caption
    where: str  # "file:row" of the row (an image found on disk: its path)
    source: str  # the source file or folder, resolved
    image_ref: str | None = None  # the image as written (a folder's: its path relative to the folder)
    image_id: Any = None  # the row's image_id as written; None when absent or empty
    metadata: dict[str, Any] | None = None


class _BadRow(ValueError):
    """Inside the readers: this row is bad (the policy decides what happens)."""

    def __init__(self, error: str, path: str | None = None) -> None:
        super().__init__(error)
        self.error, self.path = error, path


class _Policy:
    def __init__(self, policy: Policy, problems: list[Problem] | None) -> None:
        if policy not in ("strict", "skip"):
            raise ValueError(f"policy must be 'strict' or 'skip', got {policy!r}")
        if policy == "skip" and problems is None:
            raise ValueError("the skip policy needs a list to record problems in")
        self.strict = policy == "strict"
        self.problems = problems

    def bad(self, where: str, error: str, path: str | None = None) -> None:
        if self.strict:
            raise FormatError(f"{where}: {error}")
        assert self.problems is not None
        self.problems.append(Problem(where, error, path))


def source_kind(path: str | Path) -> str:
    """``folder``, ``json``, ``jsonl``, ``csv``, ``tsv``, ``captions`` or ``image``; FormatError otherwise."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"source not found: {path}")
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in SOURCE_KINDS:
        return SOURCE_KINDS[suffix]
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise FormatError(
        f"unknown source type: {path} (expected a folder, .json, .jsonl, .csv, .tsv, .txt or an image file)"
    )


def read_sources(
    sources: Iterable[str | Path],
    image_root: str | Path | None = None,
    policy: Policy = "strict",
    problems: list[Problem] | None = None,
) -> Iterator[Row]:
    for src in sources:
        yield from read_source(src, image_root, policy, problems)


def read_source(
    path: str | Path,
    image_root: str | Path | None = None,
    policy: Policy = "strict",
    problems: list[Problem] | None = None,
) -> Iterator[Row]:
    """The rows of one source, in order. ``skip`` appends the bad rows to ``problems``."""
    pol = _Policy(policy, problems)
    kind = source_kind(path)
    path = Path(path).resolve()
    root = Path(image_root) if image_root is not None else path.parent
    if kind == "folder":
        yield from _folder(path, pol)
    elif kind == "json":
        for i, obj in enumerate(read_annotation_json(path)):
            yield from _table_row(obj, root, f"{path}:[{i}]", str(path), pol)
    elif kind == "jsonl":
        yield from _jsonl(path, root, pol)
    elif kind in ("csv", "tsv"):
        yield from _csv(path, root, "\t" if kind == "tsv" else ",", pol)
    elif kind == "captions":
        yield from _caption_lines(path)
    else:
        yield from _image_row(path, path.name, str(path), pol)


def resolve_image(value: Any, root: Path) -> str | None:
    """An image reference as a row writes it -> an absolute resolved path (or the URI); None when empty.
    ValueError when it is not a string."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _BadRow(f"image must be a string path, got {type(value).__name__}")
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value:
        return value
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else root / p).resolve())


def read_annotation_json(path: Path) -> list[Any]:
    """The entries of an official annotation file (a list, or an object holding it as ``annotations``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise FormatError(
            f"{path}: expected a JSON list of {{image, caption}} entries (the ALBEF annotation "
            f"format), got {type(data).__name__}"
        )
    return data


# ---------------------------------------------------------------------------------------------------
# rows


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _BadRow(f"metadata is not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise _BadRow("metadata must be a JSON object")
    return value


def _table_row(obj: Any, root: Path, where: str, source: str, pol: _Policy) -> Iterator[Row]:
    """Zero or one row. Bad captions inside a list are bad on their own (``where/caption[k]``): under
    ``skip`` the others are kept."""
    image: str | None = None
    try:
        if not isinstance(obj, dict):
            raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
        image_key = next((k for k in IMAGE_KEYS if k in obj), None)
        cap_key = next((k for k in CAPTION_KEYS if k in obj), None)
        if image_key is None and cap_key is None:
            raise _BadRow(
                f"needs an image column ({', '.join(IMAGE_KEYS)}) or a caption column "
                f"({', '.join(CAPTION_KEYS)}); has {sorted(obj)}"
            )
        ref = obj.get(image_key) if image_key else None
        image = resolve_image(ref, root)
        value = obj.get(cap_key) if cap_key else None
        if value is not None and not isinstance(value, str | list):
            raise _BadRow(f"caption is not a string or a list of strings (got {type(value).__name__})", image)
        metadata = _metadata(obj.get("metadata"))
    except _BadRow as bad:
        pol.bad(where, bad.error, bad.path or image)
        return
    captions: list[str] = []
    wheres: list[str] = []
    bad_captions = 0
    for k, cap in enumerate([value] if isinstance(value, str) else value or []):
        if not isinstance(cap, str):
            pol.bad(f"{where}/caption[{k}]", f"caption is not a string (got {type(cap).__name__})", image)
            bad_captions += 1
        elif cap.strip():
            captions.append(cap)
            wheres.append(where)
    if bad_captions and not captions:
        return  # every caption was bad: already reported
    if image is None and not captions:
        pol.bad(where, "row has neither an image nor a caption")
        return
    image_id = obj.get("image_id")
    yield Row(
        "row",
        image,
        captions,
        wheres,
        where,
        source,
        image_ref=ref if image is not None else None,
        image_id=None if image_id in (None, "") else image_id,
        metadata=metadata,
    )


def _sidecar_metadata(image: Path, pol: _Policy) -> tuple[bool, dict[str, Any] | None]:
    """(ok, the metadata object of the image's same-name ``.json``, None when there is no such file)."""
    side = image.with_suffix(".json")
    if not side.is_file():
        return True, None
    try:
        value = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        pol.bad(f"{side}:{exc.lineno}", f"metadata file is not valid JSON ({exc.msg})", str(image))
        return False, None
    except (OSError, UnicodeDecodeError) as exc:
        pol.bad(f"{side}:0", f"metadata file unreadable: {exc}", str(image))
        return False, None
    if not isinstance(value, dict):
        pol.bad(
            f"{side}:0",
            f"metadata file must hold a JSON object (of {image.name}), got {type(value).__name__}",
            str(image),
        )
        return False, None
    return True, value


def _image_row(image: Path, ref: str, source: str, pol: _Policy) -> Iterator[Row]:
    """An image found on disk, with the captions of its same-name ``.txt`` and the metadata of its same-name
    ``.json`` (none when there is no such file)."""
    ok, meta = _sidecar_metadata(image, pol)
    if not ok:
        return
    txt = image.with_suffix(".txt")
    captions: list[str] = []
    wheres: list[str] = []
    if txt.is_file():
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            pol.bad(f"{txt}:0", f"caption file unreadable: {exc}", str(image))
            return
        for n, line in enumerate(lines, start=1):
            if line.strip():
                captions.append(line.strip())
                wheres.append(f"{txt}:{n}")
    yield Row(
        "image", str(image.resolve()), captions, wheres, str(image), source, image_ref=ref, metadata=meta
    )


def _folder(folder: Path, pol: _Policy) -> Iterator[Row]:
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    for p in files:
        yield from _image_row(p, p.relative_to(folder).as_posix(), str(folder), pol)


def _jsonl(path: Path, root: Path, pol: _Policy) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    pol.bad(where, f"not valid JSON ({exc.msg})")
                    continue
                yield from _table_row(obj, root, where, str(path), pol)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from exc


def _csv(path: Path, root: Path, delimiter: str, pol: _Policy) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise FormatError(f"{path}: empty file or no header row")
            columns = [k.strip().lower() for k in reader.fieldnames]
            if not any(k in columns for k in IMAGE_KEYS + CAPTION_KEYS):
                raise FormatError(
                    f"{path}: needs an image column ({', '.join(IMAGE_KEYS)}) or a caption column "
                    f"({', '.join(CAPTION_KEYS)}); has {columns}"
                )
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:  # more cells than the header: a shifted row, not one to guess at
                    pol.bad(where, "row has more fields than the header")
                    continue
                clean = {k.strip().lower(): (v if v is None else v.strip()) for k, v in row.items() if k}
                yield from _table_row(clean, root, where, str(path), pol)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise FormatError(f"{path}: unreadable CSV ({exc})") from exc


def _caption_lines(path: Path) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    yield Row("caption", None, [line.strip()], [where], where, str(path))
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc})") from exc
