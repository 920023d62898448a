"""Caption-truth metrics for the synthetic benchmark: was the retrieved item one the caption is true of?

The official R@K counts a hit only for the annotated image of a caption. On the synthetic world a caption is
often true of other images too ("a red circle" of every scene with a red circle), and, more to the point,
false of its group's swap-mates, the scenes that differ from its image in one attribute or relation. The
generator knows the truth of every caption in every scene (:func:`albef.model.data.synth.caption_truth`), so
retrieval can be scored by what it means:

- **caption-truth P@K**, both directions: the share of the top K results that the caption is true of
  (text -> image: images the query caption is true of; image -> text: captions true of the query image);
- **the swap suite**: every caption that is true of exactly one member of its group and false of all the
  others; the model must pick that member among the group. Chance is 1 / group size; ITC embeddings, which
  pool the scene, tend to sit near chance, and that is where ITM's cross-attention earns its keep.

A caption that the generator's grammar cannot parse is left out of both (none are, for generated data).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from albef.model.data.synth import FALSE, TRUE, caption_truth, parse_caption, scene_from_record

__all__ = ["Truth", "load_truth", "swap_suite", "truth_precision"]


@dataclass
class Truth:
    """``true[t, i]``: caption ``t`` is true of image ``i``; ``false`` likewise for clearly false (a caption
    can be neither where a relation is ambiguous). ``group[i]``: the image's scene group."""

    true: np.ndarray  # bool [n_texts, n_images]
    false: np.ndarray  # bool [n_texts, n_images]
    group: np.ndarray  # int [n_images]
    parsed: np.ndarray  # bool [n_texts]


def truth_table(scenes: Sequence[Any], texts: Sequence[str], groups: Sequence[int]) -> Truth:
    """The truth of every text in every scene (scenes as :class:`~albef.model.data.synth.Scene`)."""
    n_t, n_i = len(texts), len(scenes)
    true = np.zeros((n_t, n_i), dtype=bool)
    false = np.zeros((n_t, n_i), dtype=bool)
    parsed = np.zeros(n_t, dtype=bool)
    for t, text in enumerate(texts):
        try:
            clauses = parse_caption(text)
        except ValueError:
            continue
        parsed[t] = True
        for i, scene in enumerate(scenes):
            value = caption_truth(clauses, scene)
            true[t, i] = value == TRUE
            false[t, i] = value == FALSE
    return Truth(true, false, np.asarray(groups, dtype=np.int64), parsed)


def load_truth(eval_json: str | Path, images: Sequence[str | Path], texts: Sequence[str]) -> Truth | None:
    """The truth table of an eval set from the generator's ``scenes.json`` beside ``eval_json``; None when
    there is none (not synthetic data) or an image is not in it."""
    scenes_file = Path(eval_json).parent / "scenes.json"
    if not scenes_file.is_file():
        return None
    root = scenes_file.parent
    records = {str((root / r["image"]).resolve()): r for r in json.loads(scenes_file.read_text())}
    rows = [records.get(str(Path(p).resolve())) for p in images]
    if any(r is None for r in rows):
        return None
    return truth_table([scene_from_record(r) for r in rows], texts, [r["group"] for r in rows])


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top ``k`` per row: higher score first, the lower index first among ties."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def truth_precision(
    t2i: np.ndarray, i2t: np.ndarray, truth: Truth, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Caption-truth precision@K in % (``t2i`` [texts, images], ``i2t`` [images, texts] score matrices)."""
    out: dict[str, float] = {}
    rows = np.flatnonzero(truth.parsed)
    for k in ks:
        kt = min(k, t2i.shape[1])
        top = _top(t2i[rows], kt)
        out[f"t2i_p{k}"] = (
            round(100.0 * float(truth.true[rows[:, None], top].mean()), 3) if len(rows) else 0.0
        )
        ki = min(k, len(rows))
        if ki:
            top = _top(i2t[:, rows], ki)  # columns restricted to parsed captions
            hits = truth.true[rows][top, np.arange(i2t.shape[0])[:, None]]
            out[f"i2t_p{k}"] = round(100.0 * float(hits.mean()), 3)
        else:
            out[f"i2t_p{k}"] = 0.0
    return out


def swap_cases(truth: Truth, txt2img: Sequence[int]) -> list[tuple[int, list[int], int]]:
    """``(text, group members, index of the right member)`` for every caption true of exactly one member of
    its annotated image's group (of at least two members in the eval set) and false of all the others."""
    cases = []
    for t in np.flatnonzero(truth.parsed):
        members = np.flatnonzero(truth.group == truth.group[txt2img[t]]).tolist()
        if len(members) < 2:
            continue
        true_of = [m for m in members if truth.true[t, m]]
        if len(true_of) == 1 and all(truth.false[t, m] for m in members if m != true_of[0]):
            cases.append((int(t), members, members.index(true_of[0])))
    return cases


def swap_suite(
    cases: Sequence[tuple[int, list[int], int]], scorers: dict[str, Callable[[int, list[int]], np.ndarray]]
) -> dict[str, Any]:
    """Accuracy (%) of each scorer at picking the right member; ``scorer(text, members) -> scores``. Ties go
    to the lower image id, as in the ranking rule."""
    result: dict[str, Any] = {
        "cases": len(cases),
        "chance": round(100.0 * float(np.mean([1 / len(m) for _, m, _ in cases])), 3) if cases else None,
    }
    for name, score in scorers.items():
        hits = [int(np.argmax(score(t, members)) == right) for t, members, right in cases]
        result[name] = round(100.0 * float(np.mean(hits)), 3) if hits else None
    return result
