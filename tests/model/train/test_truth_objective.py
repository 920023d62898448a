"""train.objective truth: ITC and ITM on labels from the synthetic generator's semantics."""

from __future__ import annotations

import json

import pytest
import torch

from albef.model.albef import ALBEF
from albef.model.config import get_config
from albef.model.data.scenes import Obj, Scene
from albef.model.data.truth import truth_table
from albef.model.train.losses import masked_soft_cross_entropy
from albef.model.train.truth_objective import TruthObjective, itm_candidates


def test_candidates_hold_every_group_mate_then_random_others() -> None:
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    cand = itm_candidates(group, 6, generator=g)
    assert cand.shape == (10, 6)
    for row in range(10):
        mates = set((group == group[row]).nonzero().view(-1).tolist())
        got = cand[row].tolist()
        assert len(set(got)) == 6 and row in got
        assert set(got[: len(mates)]) == mates  # the mates come first, the rest are others
        assert not mates & set(got[len(mates) :])
    assert itm_candidates(group, 50, generator=g).shape == (10, 10)  # capped at the batch
    again = itm_candidates(group, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cand, again)


def test_masked_soft_cross_entropy_leaves_out_rows_without_a_positive() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, -5.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = -(torch.log_softmax(logits[0], 0)[:2]).mean()
    assert torch.allclose(masked_soft_cross_entropy(logits, targets), expected)
    assert masked_soft_cross_entropy(logits, torch.zeros(2, 3)) == 0


def _scenes() -> tuple[list[Scene], list[str]]:
    """Two groups of hand-built scenes whose truth is known, and one caption per scene."""
    bg = (250, 250, 250)
    rc, bs = ("circle", "red", "large"), ("square", "blue", "small")
    a = Scene((Obj(*rc, 0.27, 0.5), Obj(*bs, 0.73, 0.5)), bg, 0, "base")
    b = Scene((Obj(*bs, 0.27, 0.5), Obj(*rc, 0.73, 0.5)), bg, 0, "relation-swap")
    c = Scene(
        (Obj("circle", "blue", "large", 0.27, 0.5), Obj("square", "red", "small", 0.73, 0.5)),
        bg,
        0,
        "colour-swap",
    )
    d = Scene((Obj("triangle", "green", "small", 0.5, 0.5),), bg, 1, "base")
    captions = [
        "a red circle left of a blue square",
        "a blue square left of a red circle",
        "a blue circle left of a red square",
        "a green triangle",
    ]
    return [a, b, c, d], captions


def test_truth_labels_of_hand_built_scenes() -> None:
    scenes, captions = _scenes()
    t = truth_table(scenes, captions, [s.group for s in scenes])
    # each caption is true of its own scene only: the swaps make it false
    assert t.true.tolist() == [[i == j for j in range(4)] for i in range(4)]
    assert t.false[0, 1] and t.false[0, 2] and t.false[0, 3]


def _tiny() -> ALBEF:
    torch.manual_seed(0)
    cfg = get_config("albef-tiny-synth")
    return ALBEF(cfg)


def test_truth_objective_trains_itc_and_the_fusion_from_the_labels() -> None:
    scenes, captions = _scenes()
    t = truth_table(scenes, captions, [s.group for s in scenes])
    model = _tiny()
    obj = TruthObjective(model, random_negatives=1)
    torch.manual_seed(1)
    image = torch.randn(4, 3, 64, 64)
    ids = torch.randint(1000, 2000, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    true, false = torch.from_numpy(t.true), torch.from_numpy(t.false)
    group = torch.tensor([s.group for s in scenes])
    out = obj(image, ids, mask, true, false, group)
    for key in ("loss", "loss_itc", "loss_itm", "loss_itm_pairs", "loss_mlm", "itm_acc"):
        assert torch.isfinite(out[key]), key
    assert 0 <= float(out["itm_acc"]) <= 1
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"])
    out["loss"].backward()
    fusion = model.text_encoder.encoder.layer[model.config.text.fusion_layer]
    assert fusion.crossattention.self.query.weight.grad.abs().sum() > 0
    assert model.itm_head.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    # the labels drive the loss: calling every pair true changes it
    model.zero_grad()
    other = obj(image, ids, mask, torch.ones_like(true), torch.zeros_like(false), group)
    assert not torch.allclose(other["loss_itm"], out["loss_itm"])


def test_ambiguous_pairs_stay_out_of_the_binary_loss() -> None:
    """Positives weigh as much as a row's known negatives together; a pair that is neither clearly true nor
    clearly false weighs nothing. Checked against plain itm_logits calls."""
    import torch.nn.functional as F

    model = _tiny().eval()
    obj = TruthObjective(model, random_negatives=0)
    image = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    group = torch.tensor([0, 0])
    true = torch.eye(2, dtype=torch.bool)
    with torch.no_grad():
        known = obj(image, ids, mask, true, ~true, group)
        ambiguous = obj(image, ids, mask, true, torch.zeros(2, 2, dtype=torch.bool), group)
        _, itok = model.encode_image(image)
        _, ttok = model.encode_text(ids, mask)
        ce = torch.tensor(
            [
                [
                    float(
                        F.cross_entropy(
                            model.itm_logits(ttok[t : t + 1], mask[t : t + 1], itok[j : j + 1]),
                            torch.tensor([int(t == j)]),
                        )
                    )
                    for j in range(2)
                ]
                for t in range(2)
            ]
        )
    # the softmax part ignores the truth of negatives; the binary part is the weighted mean
    assert torch.allclose(known["loss_itm_pairs"], ambiguous["loss_itm_pairs"])
    assert torch.allclose(known["loss_itm"] - known["loss_itm_pairs"], ce.mean(), atol=1e-5)
    assert torch.allclose(
        ambiguous["loss_itm"] - ambiguous["loss_itm_pairs"], ce.diagonal().mean(), atol=1e-5
    )


def _cfg(data, **over: str) -> dict:
    from albef.model.train.settings import load_config

    base = {
        "model.config": "albef-tiny-synth",
        "model.image_res": "32",
        "data.train": f"[{data / 'train.json'}]",
        "train.objective": "truth",
        "train.truth_random_negatives": "2",
        "train.batch_size": "8",
        "train.max_steps": "6",
        "train.threads": "1",
        "optim.lr": "1e-3",
        "checkpoint.every": "100",
        "log.every": "1",
        "eval.split": "null",
        **over,
    }
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_truth_training_resumes_bit_for_bit(tmp_path) -> None:
    from albef.model.checkpoint import read_albef
    from albef.model.data.synth import generate
    from albef.model.train.trainer import Trainer

    data = tmp_path / "data"
    generate(data, 40, seed=4, size=48, progress=False)
    full = Trainer(_cfg(data), tmp_path / "full", progress=False).run()
    assert full["steps"] == 6
    Trainer(
        _cfg(data, **{"checkpoint.every": "3", "debug.stop_after": "3"}), tmp_path / "cut", progress=False
    ).run()
    Trainer(_cfg(data, **{"checkpoint.every": "3"}), tmp_path / "cut", resume=True, progress=False).run()
    a, b = read_albef(tmp_path / "full" / "final")[1], read_albef(tmp_path / "cut" / "final")[1]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss_itm"] > 0 and 0 <= r["itm_acc"] <= 1 for r in rows)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"train.scratch_warmup_steps": "10"}, "scratch_warmup_steps"),
        ({"train.group_negatives": "0.5"}, "group_negatives"),
        ({"mode": "pretrain"}, "retrieval objective"),
    ],
)
def test_truth_objective_refuses_settings_it_has_no_use_for(tmp_path, over: dict, message: str) -> None:
    from albef.model.train.settings import ConfigError

    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **over)
