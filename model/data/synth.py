"""A built-in benchmark: rendered scenes of coloured shapes with captions, built around hard negatives.

Scenes come in groups. Inside a group every image holds the same objects, but with the relation swapped
(A left of B vs B left of A) and/or one attribute swapped between two objects (red circle + blue square vs
blue circle + red square), or, for one-object groups, one attribute changed. All images of a group land in
the same split, so every test query has its hard negatives among the candidates: a bag-of-words text
embedding cannot separate them, the fusion encoder has to.

The scene model and the caption grammar with its meaning live in :mod:`albef.model.data.scenes` (re-exported
here). A caption is kept only if it is clearly true of its own image and clearly false of every other image
of its group; positions are laid out so that every pair in a scene has a clear relation.

Everything is drawn from ``random.Random(seed)`` and rendered with PIL, so the output is byte-identical for
the same seed, size and :data:`GENERATOR_VERSION`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from albef.model.data.scenes import (  # noqa: F401  (re-exported: the generator's public names)
    CLEAR_RATIO,
    COLOURS,
    FALSE,
    INVERSE,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZE_WORDS,
    SIZES,
    TRUE,
    UNKNOWN,
    Clause,
    Desc,
    Obj,
    Scene,
    caption_truth,
    captions_for,
    clause_truth,
    clear_relation,
    parse_caption,
    relation,
    scene_from_record,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-shapes-1"

SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
GROUP_SIZE = 4

# --------------------------------------------------------------------------------------------- layouts

# Slot centres (x, y). Every pair of slots has a dominant axis ratio >= 1.7 so the jitter keeps it clear.
LAYOUTS_2 = {
    "horizontal": ((0.27, 0.5), (0.73, 0.5)),
    "vertical": ((0.5, 0.27), (0.5, 0.73)),
}
LAYOUTS_3 = {
    "row": ((0.18, 0.5), (0.5, 0.5), (0.82, 0.5)),
    "column": ((0.5, 0.18), (0.5, 0.5), (0.5, 0.82)),
    "triangle-down": ((0.25, 0.25), (0.75, 0.25), (0.5, 0.75)),
    "triangle-up": ((0.5, 0.25), (0.25, 0.75), (0.75, 0.75)),
}
JITTER = 0.025


def _random_obj(rng: random.Random, x: float = 0.5, y: float = 0.5) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), x, y)


def _distinct_kinds(objs: Iterable[Obj]) -> bool:
    kinds = [o.kind for o in objs]
    return len(set(kinds)) == len(kinds)


def _swap_attr(a: Obj, b: Obj, attr: str) -> tuple[Obj, Obj]:
    return replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)})


def _group_single(rng: random.Random, n: int) -> list[tuple[str, tuple[Obj, ...]]]:
    base = _random_obj(rng, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    variants = [("base", (base,))]
    changes = {
        "colour": [c for c in COLOURS if c != base.colour],
        "shape": [s for s in SHAPES if s != base.shape],
        "size": [s for s in SIZES if s != base.size],
    }
    for attr in rng.sample(list(changes), 3)[: n - 1]:
        value = rng.choice(changes[attr])
        pos = {"x": rng.uniform(0.3, 0.7), "y": rng.uniform(0.3, 0.7)}
        variants.append((f"{attr}-change", (replace(base, **{attr: value}, **pos),)))
    return variants


def _group_multi(rng: random.Random, n: int, n_objects: int) -> list[tuple[str, tuple[Obj, ...]]]:
    while True:
        layouts = LAYOUTS_2 if n_objects == 2 else LAYOUTS_3
        slots = list(layouts[rng.choice(sorted(layouts))])
        rng.shuffle(slots)
        objs = [_random_obj(rng, x, y) for x, y in slots]
        a, b = objs[0], objs[1]
        # The swapped attribute must differ, and one more must differ, or the swap would equal a move.
        differing = [attr for attr in ("colour", "shape", "size") if getattr(a, attr) != getattr(b, attr)]
        if len(differing) < 2 or not _distinct_kinds(objs):
            continue
        attr = rng.choice(differing)
        a2, b2 = _swap_attr(a, b, attr)
        rest = tuple(objs[2:])
        variants = [
            ("base", (a, b, *rest)),
            ("relation-swap", (*moved(a, b), *rest)),
            (f"{attr}-swap", (a2, b2, *rest)),
            ("both-swap", (*moved(a2, b2), *rest)),
        ]
        if all(_distinct_kinds(v) for _, v in variants):
            # Keep the base and then a random subset of the hard negatives.
            return [variants[0], *rng.sample(variants[1:], 3)[: n - 1]]


def moved(p: Obj, q: Obj) -> tuple[Obj, Obj]:
    """p and q with their positions exchanged."""
    return replace(p, x=q.x, y=q.y), replace(q, x=p.x, y=p.y)


def _jitter(objs: tuple[Obj, ...], rng: random.Random) -> tuple[Obj, ...]:
    return tuple(
        replace(o, x=o.x + rng.uniform(-JITTER, JITTER), y=o.y + rng.uniform(-JITTER, JITTER)) for o in objs
    )


def group_sizes(n_images: int) -> list[int]:
    """Groups of 4 (the remainder as groups of 2 or 3, never a lone image unless n_images == 1)."""
    sizes = []
    left = n_images
    while left > 0:
        take = GROUP_SIZE if left >= GROUP_SIZE and left - GROUP_SIZE != 1 else min(left, 3)
        sizes.append(take)
        left -= take
    return sizes


def make_scenes(n_images: int, seed: int) -> list[Scene]:
    """All scenes, in image order (the images of a group are consecutive)."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    for group, size in enumerate(group_sizes(n_images)):
        n_objects = rng.choices((1, 2, 3), weights=(0.15, 0.5, 0.35))[0]
        if size == 1:
            n_objects = 1
        variants = _group_single(rng, size) if n_objects == 1 else _group_multi(rng, size, n_objects)
        for name, objs in variants:
            background = tuple(rng.randint(238, 255) for _ in range(3))
            scenes.append(Scene(_jitter(objs, rng), background, group, name))  # type: ignore[arg-type]
    return scenes


# --------------------------------------------------------------------------------------------- rendering

SUPERSAMPLE = 4


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """Draw at SUPERSAMPLE x the size and average down, for smooth (antialiased) edges."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        colour = COLOURS[o.colour]
        if rng is not None:  # a little colour noise so a colour is not a single RGB value
            colour = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in colour)  # type: ignore[assignment]
        r = SIZE_FRACTION[o.size] * big / 2
        cx, cy = o.x * big, o.y * big
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif o.shape == "square":
            s = r * 0.9  # a square of the same width looks bigger than the circle; shrink a little
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    return img.reduce(SUPERSAMPLE)  # box filter: an exact average of each SUPERSAMPLE^2 block


# --------------------------------------------------------------------------------------------- splits & files


def split_groups(n_groups: int, rng: random.Random) -> dict[int, str]:
    """About 80/10/10 by group; val and test get at least one group each when there are >= 3 groups."""
    order = list(range(n_groups))
    rng.shuffle(order)
    if n_groups >= 3:
        n_val = max(1, round(n_groups * SPLIT_FRACTIONS[1][1]))
        n_test = max(1, round(n_groups * SPLIT_FRACTIONS[2][1]))
    else:
        n_val = n_test = 0
    split = {}
    for rank, g in enumerate(order):
        split[g] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def generate(
    out_dir: Path,
    n_images: int,
    seed: int,
    size: int = 128,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the dataset to ``out_dir`` (built in a temp folder beside it, renamed at the end).

    Returns the counts (also stored in ``dataset.json``).
    """

    out_dir = Path(out_dir)
    if n_images < 1:
        raise ValueError("n_images must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32 pixels")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (use overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        counts = _generate_into(tmp, n_images, seed, size, progress)
        from albef import atomic

        atomic.publish_dir(tmp, out_dir, replace_existing=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synthetic dataset written", extra={"out": str(out_dir), **counts["images"]})
    return counts


def _generate_into(root: Path, n_images: int, seed: int, size: int, progress: bool) -> dict:
    from albef.progress import progress_bar

    scenes = make_scenes(n_images, seed)
    n_groups = scenes[-1].group + 1
    split_of = split_groups(n_groups, random.Random(seed + 1))
    by_group: dict[int, list[int]] = {}
    for i, s in enumerate(scenes):
        by_group.setdefault(s.group, []).append(i)

    (root / "images").mkdir()
    width = max(6, len(str(n_images - 1)))
    rng_cap = random.Random(seed + 2)
    rng_pix = random.Random(seed + 3)
    train: list[dict] = []
    evals: dict[str, list[dict]] = {"val": [], "test": []}
    records: list[dict] = []
    for i, scene in enumerate(progress_bar(scenes, desc="synth", unit="img", enabled=progress)):
        rel = f"images/{i:0{width}d}.png"
        render(scene, size, rng_pix).save(root / rel, format="PNG", optimize=False)
        others = [scenes[j] for j in by_group[scene.group] if j != i]
        caps = captions_for(scene, others, rng_cap, rng_cap.randint(3, 5))
        split = split_of[scene.group]
        if split == "train":
            train.extend({"image": rel, "caption": c, "image_id": f"synth_{i}"} for c in caps)
        else:
            evals[split].append({"image": rel, "caption": caps})
        records.append(
            {
                "image": rel,
                "image_id": f"synth_{i}",
                "split": split,
                "group": scene.group,
                "variant": scene.variant,
                "background": list(scene.background),
                "objects": [asdict(o) for o in scene.objects],
                "captions": caps,
            }
        )

    _write_json(root / "train.json", train)
    _write_json(root / "val.json", evals["val"])
    _write_json(root / "test.json", evals["test"])
    _write_json(root / "scenes.json", records)
    counts: dict[str, Any] = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "images": {
            "total": len(scenes),
            "train": sum(1 for r in records if r["split"] == "train"),
            "val": len(evals["val"]),
            "test": len(evals["test"]),
        },
        "captions": {
            "train": len(train),
            "val": sum(len(e["caption"]) for e in evals["val"]),
            "test": sum(len(e["caption"]) for e in evals["test"]),
        },
        "groups": {s: sum(1 for g in split_of.values() if g == s) for s, _ in SPLIT_FRACTIONS},
        # How often an eval caption is also true of an image of ANOTHER group of the same split: captions are
        # only discriminative within their group, so this bounds how high R@1 can get.
        "eval_captions_true_elsewhere": {s: _ambiguity(records, scenes, s) for s in ("val", "test")},
    }
    _write_json(root / "dataset.json", counts)
    return counts


def _ambiguity(records: list[dict], scenes: list[Scene], split: str) -> float:
    """Fraction of the split's captions that are not clearly false of some image of another group."""
    idx = [i for i, r in enumerate(records) if r["split"] == split]
    # Only scenes holding every mentioned shape (with its colour, when named) can make a caption true.
    by_kind: dict[tuple[str | None, str], set[int]] = {}
    for i in idx:
        for o in scenes[i].objects:
            by_kind.setdefault((o.colour, o.shape), set()).add(i)
            by_kind.setdefault((None, o.shape), set()).add(i)
    total = hits = 0
    for i in idx:
        for cap in records[i]["captions"]:
            clauses = parse_caption(cap)
            descs = [d for c in clauses for d in (c.a, c.b) if d is not None]
            candidates = set.intersection(*(by_kind.get((d.colour, d.shape), set()) for d in descs))
            total += 1
            hits += any(
                caption_truth(clauses, scenes[j]) != FALSE
                for j in sorted(candidates)
                if scenes[j].group != scenes[i].group
            )
    return round(hits / total, 4) if total else 0.0


def image_scenes(data_dir: str | Path) -> dict[str, Scene]:
    """Resolved image path -> its :class:`Scene` (with its group), from the generator's ``scenes.json``."""
    scenes_file = Path(data_dir) / "scenes.json"
    if not scenes_file.is_file():
        raise FileNotFoundError(f"{scenes_file}: no scenes.json (groups come from `albef data synth` data)")
    root = scenes_file.parent
    return {
        str((root / r["image"]).resolve()): scene_from_record(r) for r in json.loads(scenes_file.read_text())
    }


def image_groups(data_dir: str | Path) -> dict[str, int]:
    """Resolved image path -> scene group, from the generator's ``scenes.json`` in ``data_dir``.

    Images of one group are hard negatives of each other (every caption is checked false of its
    group-mates); training uses this to draw known negatives (``train.group_negatives``).
    """
    return {path: scene.group for path, scene in image_scenes(data_dir).items()}
