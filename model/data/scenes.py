"""The synthetic world's meaning: scenes of coloured shapes, the caption grammar and when a caption is true.

A scene holds one to three objects (shape, colour, size, centre). Captions follow a small grammar
(:func:`parse_caption` reads it back) with an explicit meaning (:func:`caption_truth`): a conjunction of
clauses, each "A <relation> B" or "there is A", read existentially. Relations use the dominant axis between
object centres: "A left of B" holds when B's centre is to the right of A's by at least ``CLEAR_RATIO`` times
the vertical offset. :func:`captions_for` draws captions that are clearly true of one scene and clearly false
of a list of others (its group's swap-mates). The generator (:mod:`albef.model.data.synth`) lays out, renders
and writes the scenes; the truth metrics (:mod:`albef.model.data.truth`) score retrieval with this module.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 175),
}
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.15, "large": 0.28}  # full width of a shape, as a fraction of the image side
SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "little": "small"}

RELATIONS = ("left", "right", "above", "below")
# Surface forms of each relation; the first is the canonical one.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
CLEAR_RATIO = 1.3  # dominant axis must exceed the other by this factor for a relation to be clear

TRUE, UNKNOWN, FALSE = 2, 1, 0


# --------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the image width (0 = left)
    y: float  # centre, fraction of the image height (0 = top)

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    group: int
    variant: str  # "base", "relation-swap", "<attr>-swap", "both-swap", "<attr>-change"


def relation(a: Obj, b: Obj, rel: str) -> int:
    """Truth of "a <rel> b" from the centres: TRUE, FALSE or UNKNOWN (no clearly dominant axis)."""
    dx, dy = b.x - a.x, b.y - a.y  # y grows downwards
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    if along > 0 and abs(along) >= CLEAR_RATIO * abs(across):
        return TRUE
    if along <= 0 or abs(across) >= CLEAR_RATIO * abs(along):
        return FALSE
    return UNKNOWN


def clear_relation(a: Obj, b: Obj) -> str | None:
    for rel in RELATIONS:
        if relation(a, b, rel) == TRUE:
            return rel
    return None


# --------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Desc:
    """An object description; None = not mentioned."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        return (
            o.shape == self.shape
            and (self.colour is None or o.colour == self.colour)
            and (self.size is None or o.size == self.size)
        )

    def text(self, article: str = "a") -> str:
        return " ".join(w for w in (article, self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Clause:
    """A relation "a <rel> b", or just "a" when rel is None (existence)."""

    a: Desc
    rel: str | None = None
    b: Desc | None = None


def clause_truth(clause: Clause, scene: Scene) -> int:
    """Best truth value over all bindings of the clause's objects to distinct scene objects."""
    best = FALSE
    for i, oa in enumerate(scene.objects):
        if not clause.a.matches(oa):
            continue
        if clause.rel is None:
            return TRUE
        assert clause.b is not None
        for j, ob in enumerate(scene.objects):
            if i != j and clause.b.matches(ob):
                best = max(best, relation(oa, ob, clause.rel))
                if best == TRUE:
                    return TRUE
    return best


def caption_truth(clauses: Sequence[Clause], scene: Scene) -> int:
    """A caption is a conjunction of clauses, each read existentially (and independently)."""
    return min((clause_truth(c, scene) for c in clauses), default=TRUE)


_OBJ = (
    r"(?:a|an|the) (?:(small|large|big|little) )?(?:(red|green|blue|yellow|purple) )?(circle|square|triangle)"
)
_REL = "|".join(sorted({p for ps in RELATION_PHRASES.values() for p in ps}, key=len, reverse=True))
_CLAUSE_RE = re.compile(rf"^(?:there is )?{_OBJ}(?: is)? ({_REL}) {_OBJ}$")
_SINGLE_RE = re.compile(
    rf"^(?:a picture of |an image of |there is |a drawing of )?{_OBJ}(?: on a plain background)?$"
)
_PHRASE_TO_REL = {p: rel for rel, ps in RELATION_PHRASES.items() for p in ps}


def _desc(size: str | None, colour: str | None, shape: str) -> Desc:
    return Desc(shape=shape, colour=colour, size=SIZE_WORDS[size] if size else None)


def parse_caption(text: str) -> list[Clause]:
    """Read a caption of the generator's grammar back into clauses (raises ValueError otherwise)."""
    clauses = []
    for part in text.strip().split(" and "):
        m = _CLAUSE_RE.match(part)
        if m:
            s1, c1, sh1, phrase, s2, c2, sh2 = m.groups()
            clauses.append(Clause(_desc(s1, c1, sh1), _PHRASE_TO_REL[phrase], _desc(s2, c2, sh2)))
            continue
        m = _SINGLE_RE.match(part)
        if m:
            clauses.append(Clause(_desc(*m.groups())))
            continue
        raise ValueError(f"not a caption of the synthetic grammar: {text!r}")
    return clauses


def _describe(o: Obj, rng: random.Random, full: bool = False) -> Desc:
    if full:
        return Desc(o.shape, o.colour, o.size)
    # Colour is always named: without it ("a circle left of a square") most captions would also be true of
    # many images of other groups, and R@1 would measure luck.
    return Desc(o.shape, o.colour, o.size if rng.random() < 0.5 else None)


def _relation_text(a: Desc, rel: str, b: Desc, rng: random.Random) -> str:
    phrase = rng.choice(RELATION_PHRASES[rel])
    form = rng.choice(["{a} {p} {b}", "{a} {p} {b}", "{a} is {p} {b}", "there is {a} {p} {b}"])
    return form.format(a=a.text(), p=phrase, b=b.text())


def _single_text(d: Desc, rng: random.Random) -> str:
    form = rng.choice(
        [
            "{a}",
            "a picture of {a}",
            "an image of {a}",
            "there is {a}",
            "a drawing of {a}",
            "{a} on a plain background",
        ]
    )
    return form.format(a=d.text())


def _candidate(scene: Scene, rng: random.Random, full: bool) -> str:
    objs = scene.objects
    if len(objs) == 1:
        return _single_text(_describe(objs[0], rng, full), rng)
    parts = 2 if len(objs) == 3 and rng.random() < 0.2 else 1
    # Unordered pairs, each put in a random order; two clauses never restate the same pair.
    pairs = [
        (i, j) if rng.random() < 0.5 else (j, i) for i in range(len(objs)) for j in range(i + 1, len(objs))
    ]
    texts = []
    for i, j in rng.sample(pairs, parts):
        rel = clear_relation(objs[i], objs[j])
        assert rel is not None, "layouts guarantee a clear relation between every pair"
        texts.append(_relation_text(_describe(objs[i], rng, full), rel, _describe(objs[j], rng, full), rng))
    return " and ".join(texts)


def captions_for(scene: Scene, others: Sequence[Scene], rng: random.Random, n: int) -> list[str]:
    """``n`` distinct captions, each clearly true of ``scene`` and clearly false of every scene in ``others``."""

    def ok(text: str) -> bool:
        clauses = parse_caption(text)
        return caption_truth(clauses, scene) == TRUE and all(
            caption_truth(clauses, s) == FALSE for s in others
        )

    chosen: list[str] = []
    for attempt in range(400):
        # Mostly loose descriptions (harder captions); fully specified ones are always valid, so they take
        # over when the loose ones keep failing (e.g. a one-object group whose images differ in one attribute).
        text = _candidate(scene, rng, full=attempt >= 60 or rng.random() < 0.2)
        if text not in chosen and ok(text):
            chosen.append(text)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"could not find {n} discriminative captions for {scene}")  # pragma: no cover


def scene_from_record(record: dict) -> Scene:
    """Rebuild a :class:`Scene` from an entry of ``scenes.json``."""
    return Scene(
        tuple(Obj(**o) for o in record["objects"]),
        tuple(record["background"]),  # type: ignore[arg-type]
        record["group"],
        record["variant"],
    )
