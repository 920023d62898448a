"""Annotation formats: the official ALBEF JSON (docs/model.md §4.5), JSONL, CSV and folders of images with captions.

Training reads *pairs* (:func:`load_pairs`), evaluation reads the official val/test layout (:func:`load_eval_set`).
A bad row (missing field, caption that is not a string, image file not found) never stops loading: it is
returned as a problem ``{"source": "file:row", "path": ..., "error": ...}``. A source that cannot be read at
all (missing, unknown extension, not valid JSON/CSV) raises ``ValueError`` with a one-line message.

Row numbers in ``source``: for a JSON list it is the 0-based index of the entry (``train.json:[12]``); for
JSONL and CSV it is the 1-based line number, as an editor shows it (``train.csv:14``); for a folder it is
the caption file and its line (``imgs/a.txt:2``).
Image paths are resolved against ``image_root`` when given, else against the annotation file's folder;
absolute paths are used as they are. Torch-free.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class PairItem:
    """One (image, caption) training pair."""

    image: Path  # absolute path
    caption: str  # raw caption (pre_caption is applied later, by the tokenizer)
    image_id: str  # groups the captions of one image; the idx positives of retrieval training
    source: str  # "file:row", for error reports


@dataclass
class EvalSet:
    """The official val/test layout: text ids in file order, ``img2txt[i]`` text ids, ``txt2img[t]`` image."""

    images: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)

    def subset(self, n_images: int) -> EvalSet:
        """The first ``n_images`` images and their captions (a quicker eval)."""
        out = EvalSet()
        for i, img in enumerate(self.images[:n_images]):
            out.images.append(img)
            out.img2txt.append([])
            for t in self.img2txt[i]:
                out.img2txt[-1].append(len(out.texts))
                out.texts.append(self.texts[t])
                out.txt2img.append(i)
        return out


class _Reader:
    """Collects items and problems of one source."""

    def __init__(self, path: Path, image_root: Path | None) -> None:
        self.path = path
        self.root = image_root if image_root is not None else path.parent
        self.items: list[PairItem] = []
        self.problems: list[dict[str, Any]] = []

    def problem(self, row: str, error: str, image: str | Path | None = None) -> None:
        self.problems.append(
            {"source": f"{self.path}:{row}", "path": None if image is None else str(image), "error": error}
        )

    def resolve(self, image: str) -> Path:
        p = Path(image)
        return (p if p.is_absolute() else self.root / p).absolute()

    def add(self, row: str, entry: Any, default_id: str | None = None) -> None:
        """One record {image, caption (str or list of str), image_id?}."""
        if not isinstance(entry, dict):
            self.problem(row, f"entry is a {type(entry).__name__}, not an object")
            return
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            self.problem(row, "missing or non-string field 'image'")
            return
        if "caption" not in entry or entry["caption"] is None:
            self.problem(row, "missing field 'caption'", image)
            return
        path = self.resolve(image)
        if not path.is_file():
            self.problem(row, "image file not found", path)
            return
        raw_id = entry.get("image_id")
        image_id = str(raw_id) if raw_id not in (None, "") else (default_id or image)
        captions = entry["caption"]
        if isinstance(captions, str):
            captions = [captions]
            suffix = [""]
        elif isinstance(captions, list):
            suffix = [f"/caption[{k}]" for k in range(len(captions))]
        else:
            self.problem(row, f"caption is a {type(captions).__name__}, not a string", path)
            return
        for cap, suf in zip(captions, suffix, strict=True):
            if not isinstance(cap, str):
                self.problem(row + suf, f"caption is a {type(cap).__name__}, not a string", path)
            elif not cap.strip():
                self.problem(row + suf, "empty caption", path)
            else:
                self.items.append(PairItem(path, cap, image_id, f"{self.path}:{row}"))


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def _load_json(r: _Reader) -> None:
    data = _read_json(r.path)
    if not isinstance(data, list):
        raise ValueError(
            f"{r.path}: expected a JSON list of {{image, caption}} entries, got {type(data).__name__}"
        )
    for i, entry in enumerate(data):
        r.add(f"[{i}]", entry)


def _load_jsonl(r: _Reader) -> None:
    try:
        lines = r.path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{r.path}: not UTF-8 text ({exc})") from exc
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            r.problem(str(n), f"invalid JSON: {exc.msg}")
            continue
        r.add(str(n), entry)


def _load_csv(r: _Reader) -> None:
    try:
        with r.path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("image", "caption") if c not in header]
            if missing:
                raise ValueError(
                    f"{r.path}: CSV header must have columns image,caption[,image_id]; missing {','.join(missing)}"
                )
            for row in reader:
                line = reader.line_num  # the physical line where this row ended
                if None in row:  # more fields than the header
                    r.problem(str(line), "row has more fields than the header")
                    continue
                r.add(str(line), {k: v for k, v in row.items() if v is not None})
    except UnicodeDecodeError as exc:
        raise ValueError(f"{r.path}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise ValueError(f"{r.path}: unreadable CSV ({exc})") from exc


def _load_folder(r: _Reader) -> None:
    """Every image with a same-name ``.txt`` beside it; one caption per non-empty line. image_id = the
    image's path relative to the folder. Images without a caption file are skipped (counted in the log)."""
    folder = r.path
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()  # deterministic order
        names = set(filenames)
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            stem = os.path.splitext(name)[0]
            txt = stem + ".txt"
            image = Path(dirpath) / name
            if txt not in names:
                skipped += 1
                continue
            rel_id = image.relative_to(folder).as_posix()
            txt_path = Path(dirpath) / txt
            try:
                lines = txt_path.read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError) as exc:
                r.problems.append(
                    {"source": f"{txt_path}:0", "path": str(image), "error": f"unreadable: {exc}"}
                )
                continue
            for n, line in enumerate(lines, start=1):
                if line.strip():
                    r.items.append(PairItem(image.absolute(), line.strip(), rel_id, f"{txt_path}:{n}"))
    if skipped:
        log.info("images without a caption file skipped", extra={"folder": str(folder), "skipped": skipped})


_LOADERS = {".json": _load_json, ".jsonl": _load_jsonl, ".csv": _load_csv}


def load_pairs(
    sources: Sequence[str | Path], image_root: str | Path | None = None
) -> tuple[list[PairItem], list[dict[str, Any]]]:
    """All (image, caption) pairs of the sources, in order, and the bad rows found on the way.

    A source is an official train JSON (``caption`` a string) or val/test JSON (``caption`` a list: one
    pair per caption), a JSONL file, a CSV file (header ``image,caption[,image_id]``) or a folder of images
    with same-name ``.txt`` caption files. Missing ``image_id`` -> the image path as written.
    """
    if isinstance(sources, str | Path):
        sources = [sources]
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"image root is not a folder: {root}")
    items: list[PairItem] = []
    problems: list[dict[str, Any]] = []
    for src in sources:
        path = Path(src)
        reader = _Reader(path, root)
        if path.is_dir():
            reader.root = path
            _load_folder(reader)
        elif not path.exists():
            raise ValueError(f"annotation source not found: {path}")
        else:
            loader = _LOADERS.get(path.suffix.lower())
            if loader is None:
                raise ValueError(
                    f"{path}: unknown annotation format {path.suffix!r} (expected .json, .jsonl, .csv or a folder)"
                )
            loader(reader)
        items.extend(reader.items)
        problems.extend(reader.problems)
        log.info(
            "annotations loaded",
            extra={"source": str(path), "pairs": len(reader.items), "problems": len(reader.problems)},
        )
    return items, problems


def load_eval_set(path: str | Path, image_root: str | Path | None = None) -> EvalSet:
    """The official val/test JSON (list of ``{"image", "caption": [str, ...]}``), text ids in file order.

    A caption given as a single string is wrapped in a list with a warning (the official loader would iterate
    it character by character, ALBEF issue #72). Other sources (JSONL, CSV, a train-format JSON, a folder)
    are grouped by ``image_id`` in first-seen order. Raises ``ValueError`` when a row is bad or an image is
    missing: an eval set with holes would give numbers that cannot be compared.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"eval annotation not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    out = EvalSet()
    if path.is_file() and path.suffix.lower() == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{image, caption: [...]}} entries")
        if data and all(isinstance(e, dict) and isinstance(e.get("caption"), list) for e in data):
            _official_eval(path, data, root, out)
            return out
        if data and all(isinstance(e, dict) and "image_id" not in e for e in data):
            _official_eval(path, data, root, out)  # strings without image_id: the issue-#72 case
            return out
    items, problems = load_pairs([path], image_root)
    if problems:
        p = problems[0]
        raise ValueError(f"{p['source']}: {p['error']} ({p['path']}); {len(problems)} bad row(s) in total")
    index: dict[str, int] = {}
    for item in items:
        if item.image_id not in index:
            index[item.image_id] = len(out.images)
            out.images.append(item.image)
            out.img2txt.append([])
        i = index[item.image_id]
        out.img2txt[i].append(len(out.texts))
        out.texts.append(item.caption)
        out.txt2img.append(i)
    return out


def _official_eval(path: Path, data: list[Any], root: Path, out: EvalSet) -> None:
    wrapped = 0
    for i, entry in enumerate(data):
        where = f"{path}:[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{where}: entry needs a string field 'image'")
        captions = entry.get("caption")
        if isinstance(captions, str):
            captions = [captions]
            wrapped += 1
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{where}: 'caption' must be a list of strings")
        image = Path(entry["image"])
        image = (image if image.is_absolute() else root / image).absolute()
        if not image.is_file():
            raise ValueError(f"{where}: image file not found: {image}")
        out.images.append(image)
        out.img2txt.append([])
        for cap in captions:
            out.img2txt[-1].append(len(out.texts))
            out.texts.append(cap)
            out.txt2img.append(len(out.images) - 1)
    if wrapped:
        log.warning(
            "eval captions given as strings were wrapped in lists (the official loader would split them into "
            "characters, ALBEF issue #72)",
            extra={"file": str(path), "entries": wrapped},
        )
    empty = sum(1 for t in out.img2txt if not t)
    if empty:
        log.warning(
            "eval images without captions (they count as misses image->text)",
            extra={"file": str(path), "images": empty},
        )


def assign_idx(items: Sequence[PairItem]) -> list[int]:
    """A contiguous int per distinct ``image_id``, in first-seen order (the ``idx`` of retrieval training)."""
    index: dict[str, int] = {}
    return [index.setdefault(item.image_id, len(index)) for item in items]
