"""Caption-truth metrics (albef.model.data.truth) on hand-built scenes whose truth is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from albef.model.data.synth import Obj, Scene
from albef.model.data.truth import load_truth, swap_cases, swap_suite, truth_precision, truth_table

RED_CIRCLE_L = Obj("circle", "red", "small", 0.2, 0.5)
BLUE_SQUARE_R = Obj("square", "blue", "large", 0.8, 0.5)
RED_CIRCLE_R = Obj("circle", "red", "small", 0.8, 0.5)
BLUE_SQUARE_L = Obj("square", "blue", "large", 0.2, 0.5)
GREEN_TRI = Obj("triangle", "green", "small", 0.5, 0.5)
WHITE = (255, 255, 255)

# Group 0: a relation swap; group 1: one scene alone.
SCENES = [
    Scene((RED_CIRCLE_L, BLUE_SQUARE_R), WHITE, 0, "base"),  # image 0
    Scene((RED_CIRCLE_R, BLUE_SQUARE_L), WHITE, 0, "relation-swap"),  # image 1
    Scene((GREEN_TRI,), WHITE, 1, "base"),  # image 2
]
TEXTS = [
    "a red circle left of a blue square",  # 0: true of image 0 only (false of its swap-mate)
    "a red circle right of a blue square",  # 1: true of image 1 only
    "a red circle",  # 2: true of images 0 and 1: not a swap case
    "a green triangle",  # 3: true of image 2; its group has one member
    "a purple square",  # 4: true of nothing
]
TXT2IMG = [0, 1, 0, 2, 0]


def test_truth_table_follows_the_scene_semantics() -> None:
    t = truth_table(SCENES, TEXTS, [s.group for s in SCENES])
    assert t.true.tolist() == [
        [True, False, False],
        [False, True, False],
        [True, True, False],
        [False, False, True],
        [False, False, False],
    ]
    assert t.false[0].tolist() == [False, True, True] and t.parsed.all()
    t2 = truth_table(SCENES, ["a dog on a sofa"], [0, 0, 1])
    assert not t2.parsed[0]


def test_precision_counts_any_true_result_not_only_the_annotated_image() -> None:
    t = truth_table(SCENES, TEXTS, [0, 0, 1])
    # text->image scores [texts, images]: text 2 ("a red circle") ranks image 1 first: true, though its
    # annotated image is 0; text 0 ranks its swap-mate first: false.
    t2i = np.array([[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.1], [0.0, 0.1, 0.9], [0.3, 0.2, 0.1]])
    i2t = np.array(
        [
            [0.9, 0.1, 0.5, 0.0, 0.0],  # image 0: caption 0 first (true)
            [0.9, 0.1, 0.5, 0.0, 0.0],  # image 1: caption 0 first (false)
            [0.0, 0.0, 0.0, 0.9, 0.1],
        ]
    )  # image 2: caption 3 first (true)
    p = truth_precision(t2i, i2t, t, ks=(1, 2))
    assert p["t2i_p1"] == pytest.approx(100 * 3 / 5, abs=1e-3)  # texts 1, 2, 3
    assert p["i2t_p1"] == pytest.approx(100 * 2 / 3, abs=1e-3)
    # top 2 of image 1: captions 0 (false) and 2 (true); image 0: 0 and 2, both true; image 2: 3 and 4
    assert p["i2t_p2"] == pytest.approx(100 * (2 + 1 + 1) / 6, abs=1e-3)
    # ties go to the lower id: all-equal scores pick image 0 first
    flat = truth_precision(np.zeros((5, 3)), np.zeros((3, 5)), t, ks=(1,))
    assert flat["t2i_p1"] == pytest.approx(100 * 2 / 5, abs=1e-3)  # texts 0 and 2 are true of image 0


def test_swap_suite_keeps_only_captions_true_of_exactly_one_group_member() -> None:
    t = truth_table(SCENES, TEXTS, [0, 0, 1])
    cases = swap_cases(t, TXT2IMG)
    assert cases == [(0, [0, 1], 0), (1, [0, 1], 1)]
    sims = np.array([[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 0]])  # ITC: blind to the relation
    itm = {(0, 0): 2.0, (0, 1): -1.0, (1, 0): -1.0, (1, 1): 2.0}
    res = swap_suite(
        cases,
        {"itc": lambda tx, ms: sims[ms, tx], "itm": lambda tx, ms: np.array([itm[(tx, m)] for m in ms])},
    )
    assert res == {"cases": 2, "chance": 50.0, "itc": 50.0, "itm": 100.0}


def test_load_truth_reads_the_generators_scenes(tmp_path: Path) -> None:
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.synth import caption_truth, generate, parse_caption, scene_from_record

    generate(tmp_path / "s", 60, seed=11, size=48, progress=False)
    es = load_eval_set(tmp_path / "s" / "test.json")
    truth = load_truth(tmp_path / "s" / "test.json", es.images, es.texts)
    assert truth is not None and truth.parsed.all()
    records = {r["image"]: r for r in json.loads((tmp_path / "s" / "scenes.json").read_text())}
    for t, i in enumerate(es.txt2img):  # every caption is true of its own image
        assert truth.true[t, i]
        rec = records[str(Path(es.images[i]).relative_to(tmp_path / "s"))]
        assert caption_truth(parse_caption(es.texts[t]), scene_from_record(rec)) == 2
    assert load_truth(tmp_path / "elsewhere.json", es.images, es.texts) is None
