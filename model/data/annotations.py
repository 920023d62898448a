"""Training and evaluation data: (image, caption) pairs (:func:`load_pairs`) and the official val/test layout
(:func:`load_eval_set`). Torch-free.

The formats themselves (the official ALBEF JSON, JSONL, CSV/TSV, folders of images with ``.txt`` captions),
their column names, row locations and how image paths resolve are those of :mod:`albef.model.data.formats`,
the reader the index builder uses too, so a source one accepts the other accepts. Training reads under the
``skip`` policy: a bad row never stops loading, it is returned as a problem ``{"source": "file:row", "path":
..., "error": ...}``. A source that cannot be read at all (missing, unknown extension, not valid JSON, not
UTF-8, no usable header) raises ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from albef.model.data import formats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairItem:
    """One (image, caption) training pair."""

    image: Path  # absolute resolved path
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


def load_pairs(
    sources: Sequence[str | Path], image_root: str | Path | None = None
) -> tuple[list[PairItem], list[dict[str, Any]]]:
    """All (image, caption) pairs of the sources, in order, and the bad rows found on the way.

    Sources are read by :mod:`albef.model.data.formats` under its ``skip`` policy: an official train JSON
    (``caption`` a string) or val/test JSON (``caption`` a list: one pair per caption), JSONL, CSV or TSV,
    a folder of images with same-name ``.txt`` caption files, or one such image. A row without an image or
    without a caption, or whose image file is missing, is a problem too: it gives no pair. Images found on
    disk without a caption file are skipped (counted in the log). Missing ``image_id`` -> the image path as
    written (in a folder: relative to it).
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
        if formats.source_kind(path) == "captions":
            raise ValueError(f"{path}: a caption file holds no images; training needs (image, caption) pairs")
        pairs, found, uncaptioned = _pairs(path, root)
        items.extend(pairs)
        problems.extend(p.as_dict() for p in found)
        if uncaptioned:
            log.info(
                "images without a caption file skipped", extra={"folder": str(path), "skipped": uncaptioned}
            )
        log.info(
            "annotations loaded", extra={"source": str(path), "pairs": len(pairs), "problems": len(found)}
        )
    return items, problems


def _pairs(path: Path, root: Path | None) -> tuple[list[PairItem], list[formats.Problem], int]:
    items: list[PairItem] = []
    found: list[formats.Problem] = []  # the reader's bad rows and ours, in file order
    uncaptioned = 0
    for row in formats.read_source(path, root, "skip", found):
        if row.image is None:
            found.append(formats.Problem(row.where, "missing image"))
            continue
        if not row.captions:
            if row.kind == "image":
                uncaptioned += 1
            else:
                found.append(formats.Problem(row.where, "missing or empty caption", row.image))
            continue
        image = Path(row.image)
        if not image.is_file():
            found.append(formats.Problem(row.where, "image file not found", row.image))
            continue
        image_id = str(row.image_id) if row.image_id is not None else str(row.image_ref)
        items.extend(
            PairItem(image, cap, image_id, where)
            for cap, where in zip(row.captions, row.caption_where, strict=True)
        )
    return items, found, uncaptioned


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
        data = formats.read_annotation_json(path)
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
        resolved = formats.resolve_image(entry["image"], root)  # None for ""
        if resolved is None or not Path(resolved).is_file():
            raise ValueError(f"{where}: image file not found: {resolved or entry['image']!r}")
        out.images.append(Path(resolved))
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
