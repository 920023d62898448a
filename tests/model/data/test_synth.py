"""The synthetic benchmark: determinism, official formats, true and discriminative captions, hard negatives."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef.model.data import synth

N_IMAGES = 48
SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.generate(out, N_IMAGES, seed=7, size=SIZE, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.generate(again, N_IMAGES, seed=7, size=SIZE, progress=False)
    a, b = _files(dataset), _files(again)
    assert a.keys() == b.keys()
    assert len([k for k in a if k.startswith("images/")]) == N_IMAGES
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    # Nothing left behind by the temp-folder-and-rename write.
    assert [p.name for p in tmp_path.iterdir()] == ["again"]

    other = tmp_path / "other"
    synth.generate(other, N_IMAGES, seed=8, size=SIZE, progress=False)
    assert _files(other)["test.json"] != a["test.json"]


def test_official_formats_and_splits(dataset: Path) -> None:
    train = json.loads((dataset / "train.json").read_text())
    val = json.loads((dataset / "val.json").read_text())
    test = json.loads((dataset / "test.json").read_text())
    meta = json.loads((dataset / "dataset.json").read_text())
    scenes = json.loads((dataset / "scenes.json").read_text())

    for e in train:
        assert set(e) == {"image", "caption", "image_id"}
        assert isinstance(e["caption"], str) and e["caption"]
        assert re.fullmatch(r"images/\d{6}\.png", e["image"])
        assert e["image_id"] == f"synth_{int(e['image'][7:13])}"
    for split in (val, test):
        assert split, "val and test must not be empty"
        for e in split:
            assert set(e) == {"image", "caption"}
            assert isinstance(e["caption"], list) and 3 <= len(e["caption"]) <= 5
            assert all(isinstance(c, str) for c in e["caption"])
            assert len(set(e["caption"])) == len(e["caption"])

    train_images = {e["image"] for e in train}
    per_split = {"train": train_images, "val": {e["image"] for e in val}, "test": {e["image"] for e in test}}
    assert sum(len(s) for s in per_split.values()) == N_IMAGES
    assert set.union(*per_split.values()) == {f"images/{i:06d}.png" for i in range(N_IMAGES)}
    for image in per_split["train"]:
        assert 3 <= sum(1 for e in train if e["image"] == image) <= 5
    # Splits are by group: every group lies in exactly one split.
    split_of_group: dict[int, set[str]] = {}
    for r in scenes:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
        assert r["image"] in per_split[r["split"]]
    assert all(len(s) == 1 for s in split_of_group.values())
    assert meta["seed"] == 7 and meta["generator"] == synth.GENERATOR_VERSION
    assert meta["images"] == {"total": N_IMAGES, **{k: len(v) for k, v in per_split.items()}}
    assert meta["captions"]["train"] == len(train)
    assert meta["captions"]["test"] == sum(len(e["caption"]) for e in test)
    assert all((dataset / img).is_file() for img in per_split["train"])


# An independent reading of the caption grammar, so the generator's own parser is not the judge.
_OBJ = r"(?:a|the) (?:(small|large) )?(?:(red|green|blue|yellow|purple) )?(circle|square|triangle)"
_REL = {"left of": "left", "to the left of": "left", "on the left of": "left", "right of": "right",
        "to the right of": "right", "on the right of": "right", "above": "above", "below": "below",
        "under": "below"}  # fmt: skip
_CLAUSE = re.compile(
    rf"(?:there is )?{_OBJ}(?: is)? ({'|'.join(sorted(_REL, key=len, reverse=True))}) {_OBJ}"
)
_SINGLE = re.compile(
    rf"(?:a picture of |an image of |there is |a drawing of )?{_OBJ}(?: on a plain background)?"
)


def _match(desc: tuple, o: dict) -> bool:
    size, colour, shape = desc
    return o["shape"] == shape and colour in (None, o["colour"]) and size in (None, o["size"])


def _holds(rel: str, a: dict, b: dict) -> bool:
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along > 1.3 * abs(across)


def _plausible(rel: str, a: dict, b: dict) -> bool:
    """Not clearly false: the direction is right and the other axis does not clearly dominate."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along > 0 and abs(across) < 1.3 * along


def _true(caption: str, objects: list[dict], strict: bool) -> bool:
    check = _holds if strict else _plausible
    for part in caption.split(" and "):
        m = _CLAUSE.fullmatch(part)
        if m:
            s1, c1, h1, rel, s2, c2, h2 = m.groups()
            ok = any(
                _match((s1, c1, h1), a) and _match((s2, c2, h2), b) and check(_REL[rel], a, b)
                for i, a in enumerate(objects)
                for j, b in enumerate(objects)
                if i != j
            )
        else:
            m = _SINGLE.fullmatch(part)
            assert m, f"caption outside the grammar: {caption!r}"
            ok = any(_match(m.groups(), o) for o in objects)
        if not ok:
            return False
    return True


def test_captions_true_of_their_image_and_false_of_its_hard_negatives(dataset: Path) -> None:
    scenes = json.loads((dataset / "scenes.json").read_text())
    groups: dict[int, list[dict]] = {}
    for r in scenes:
        groups.setdefault(r["group"], []).append(r)
    checked = 0
    for r in scenes:
        for cap in r["captions"]:
            assert _true(cap, r["objects"], strict=True), (r["image"], cap)
            for other in groups[r["group"]]:
                if other is not r:
                    assert not _true(cap, other["objects"], strict=False), (r["image"], other["image"], cap)
            checked += 1
    assert checked >= 3 * N_IMAGES


def test_images_show_their_scene(dataset: Path) -> None:
    scenes = json.loads((dataset / "scenes.json").read_text())
    palette = {k: np.array(v, dtype=float) for k, v in synth.COLOURS.items()}
    for r in scenes:
        img = np.asarray(Image.open(dataset / r["image"]).convert("RGB"), dtype=float)
        assert img.shape == (SIZE, SIZE, 3)
        assert np.abs(img[0, 0] - np.array(r["background"])).max() <= 2  # corners are background
        for o in r["objects"]:
            px = img[int(o["y"] * SIZE), int(o["x"] * SIZE)]
            nearest = min(palette, key=lambda c: float(np.abs(palette[c] - px).sum()))
            assert nearest == o["colour"], (r["image"], o, px)
            # Size: the longest run of the object's colour through its centre (horizontal or vertical) is
            # about 2r for every shape: large ones exceed 0.2 of the side, small ones stay below.
            close = np.abs(img - palette[o["colour"]]).sum(-1) < 90
            cy, cx = int(o["y"] * SIZE), int(o["x"] * SIZE)
            extent = max(_run(close[cy, :], cx), _run(close[:, cx], cy))
            assert (extent > 0.2 * SIZE) == (o["size"] == "large"), (r["image"], o, extent)


def _run(line: np.ndarray, centre: int) -> int:
    lo = hi = centre
    while lo > 0 and line[lo - 1]:
        lo -= 1
    while hi < len(line) - 1 and line[hi + 1]:
        hi += 1
    return hi - lo + 1


def test_hard_negatives_share_bags_of_words_within_each_split(dataset: Path) -> None:
    scenes = json.loads((dataset / "scenes.json").read_text())
    groups: dict[int, list[dict]] = {}
    for r in scenes:
        groups.setdefault(r["group"], []).append(r)
    multi = 0
    for members in groups.values():
        assert len(members) >= 2, "every image has a hard negative in its group"
        assert len({m["split"] for m in members}) == 1
        if len(members[0]["objects"]) == 1:
            # One-object groups: each variant differs from the base in exactly one attribute.
            base = members[0]["objects"][0]
            for m in members[1:]:
                o = m["objects"][0]
                assert sum(o[k] != base[k] for k in ("shape", "colour", "size")) == 1
            continue
        multi += 1
        # Same words (bags of colours, shapes, sizes), different scene.
        bags = {
            tuple(
                tuple(sorted(Counter(o[k] for o in m["objects"]).items()))
                for k in ("colour", "shape", "size")
            )
            for m in members
        }
        assert len(bags) == 1
        layouts = {
            tuple(
                sorted(
                    (o["colour"], o["shape"], o["size"], round(o["x"], 1), round(o["y"], 1))
                    for o in m["objects"]
                )
            )
            for m in members
        }
        assert len(layouts) == len(members)
        assert {m["variant"] for m in members} <= {"base", "relation-swap", "both-swap", "colour-swap", "shape-swap",
                                                   "size-swap"}  # fmt: skip
    assert multi > 0


def test_group_sizes_never_leave_a_lone_image() -> None:
    for n in range(2, 40):
        sizes = synth.group_sizes(n)
        assert sum(sizes) == n and min(sizes) >= 2 and max(sizes) <= synth.GROUP_SIZE


def test_cli_synth_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from albef.cli import main

    out = tmp_path / "cli"
    assert main(["data", "synth", str(out), "--images", "12", "--seed", "3", "--size", "48"]) == 0
    assert "12 images" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text())["images"]["total"] == 12
    before = (out / "train.json").read_bytes()

    assert main(["data", "synth", str(out), "--images", "12", "--seed", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "train.json").read_bytes() == before  # untouched

    assert main(["data", "synth", str(out), "--images", "12", "--seed", "4", "--size", "48", "--force"]) == 0
    assert (out / "train.json").read_bytes() != before
    assert main(["data", "synth", str(tmp_path / "x"), "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err
