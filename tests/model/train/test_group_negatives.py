"""Known hard negatives: whole-group batches and group-mate ITM negatives (train.group_negatives)."""

from __future__ import annotations

import json

import pytest
import torch

from albef.model.train import losses as L
from albef.model.train.dataset import GroupBatches


def _pairs() -> tuple[list[int], list[int]]:
    # 12 images in 3 groups of 4, each image with 2 captions (pairs 2i, 2i+1)
    idx = [i // 2 for i in range(24)]
    groups = [i // 8 for i in range(24)]
    return idx, groups


def test_group_batches_visit_every_image_once_and_keep_groups_together() -> None:
    idx, groups = _pairs()
    sampler = GroupBatches(idx, groups, batch_size=4, world=1, rank=0, seed=3)
    batches = list(sampler.batches(0))
    assert sampler.num_batches == 3 and len(batches) == 3
    images = [idx[i] for b in batches for _, i in b]
    assert sorted(images) == list(range(12))  # every image once, one of its captions
    for b in batches:  # groups of 4 with batch 4: each batch is exactly one group
        assert len({groups[i] for _, i in b}) == 1
    # a function of (seed, epoch): the same again, another epoch differs, resume skips micro-batches
    assert batches == list(GroupBatches(idx, groups, 4, 1, 0, seed=3).batches(0))
    assert batches != list(sampler.batches(1))
    assert list(sampler.batches(0, start=2)) == batches[2:]


def test_group_batches_shard_groups_across_ranks() -> None:
    idx, groups = _pairs()
    r0 = list(GroupBatches(idx, groups, 4, world=2, rank=0, seed=1).batches(0))
    r1 = list(GroupBatches(idx, groups, 4, world=2, rank=1, seed=1).batches(0))
    g0 = {groups[i] for b in r0 for _, i in b}
    g1 = {groups[i] for b in r1 for _, i in b}
    assert g0 and g1 and not g0 & g1


def test_group_negatives_are_group_mates_and_never_positives() -> None:
    group = torch.tensor([0, 0, 0, 1, 1, 2, -1])
    idx = torch.tensor([0, 1, 1, 2, 3, 4, 5])  # items 1 and 2 share an image: positives of each other
    positives = L.positive_mask(7, idx)
    mates = L.group_mates(group, positives)
    assert mates[0].tolist() == [False, True, True, False, False, False, False]
    assert mates[1].tolist() == [True, False, False, False, False, False, False]
    assert not mates[5].any() and not mates[6].any()  # a lone member and an ungrouped item have none
    start = torch.full((7,), 6)
    valid = torch.zeros(7, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    index, ok = L.mix_group_negatives(start, valid, mates, 1.0, generator=g)
    for row in range(5):
        assert ok[row] and mates[row, index[row]], row
    assert index[5] == 6 and index[6] == 6 and not ok[5] and not ok[6]  # left as they were
    # probability 0 changes nothing
    same, same_ok = L.mix_group_negatives(start, valid, mates, 0.0, generator=g)
    assert torch.equal(same, start) and torch.equal(same_ok, valid)


def test_training_with_group_negatives_resumes_bit_for_bit(tmp_path) -> None:
    """Group batches and group-mate negatives keep the trainer's guarantee: a resumed run equals an
    uninterrupted one (the negatives are drawn from the checkpointed RNG, the batches from (seed, epoch))."""
    from albef.model.checkpoint import read_albef
    from albef.model.data.synth import generate
    from albef.model.train.settings import load_config
    from albef.model.train.trainer import Trainer

    data = tmp_path / "data"
    generate(data, 24, seed=4, size=48, progress=False)

    def cfg(**over: str) -> dict:
        base = {
            "model.image_res": "32",
            "data.train": f"[{data / 'train.json'}]",
            "train.batch_size": "4",
            "train.max_steps": "6",
            "train.queue_size": "16",
            "train.threads": "1",
            "optim.lr": "1e-3",
            "train.group_negatives": "1.0",
            "train.group_negatives_start": "2",
            "checkpoint.every": "100",
            "log.every": "1",
            "eval.split": "null",
            **over,
        }
        return load_config(None, [f"{k}={v}" for k, v in base.items()])

    full = Trainer(cfg(), tmp_path / "full", progress=False).run()
    assert full["steps"] == 6
    Trainer(cfg(**{"checkpoint.every": "3", "debug.stop_after": "3"}), tmp_path / "cut", progress=False).run()
    Trainer(cfg(**{"checkpoint.every": "3"}), tmp_path / "cut", resume=True, progress=False).run()
    a, b = read_albef(tmp_path / "full" / "final")[1], read_albef(tmp_path / "cut" / "final")[1]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_group_negatives_need_the_generators_scenes(tmp_path) -> None:
    from albef.model.data.synth import generate
    from albef.model.train.settings import load_config
    from albef.model.train.trainer import Trainer

    data = tmp_path / "data"
    generate(data, 8, seed=1, size=48, progress=False)
    (data / "scenes.json").unlink()
    cfg = load_config(
        None,
        [
            f"data.train=[{data / 'train.json'}]",
            "train.group_negatives=0.5",
            "model.image_res=32",
            "train.batch_size=2",
            "train.queue_size=4",
            "train.max_steps=1",
            "eval.split=null",
        ],
    )
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        Trainer(cfg, tmp_path / "run", progress=False).run()


def test_itm_pairs_loss_scores_every_pair_like_the_plain_fusion_path() -> None:
    """The contrastive ITM aid: its K/V-reusing pair scores equal plain itm_logits calls, it is added to the
    ITM loss with its weight, and its gradient reaches the fusion layers."""
    from albef.model.factory import create_model
    from albef.model.train.objective import AlbefObjective

    torch.manual_seed(0)
    model = create_model("albef-tiny", image_res=32).train()
    for mod in model.modules():  # dropout off: the two paths must see the same arithmetic
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    obj = AlbefObjective(model, queue_size=8, itm_pairs_weight=0.5)
    B = 4
    image = torch.randn(B, 3, 32, 32)
    ids = torch.randint(1000, 2000, (B, 6))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    _, image_tokens = model.encode_image(image)
    _, text_tokens = model.encode_text(ids, mask)
    positives = L.positive_mask(B, torch.arange(B))
    got = obj._itm_pairs(text_tokens, mask, image_tokens, positives)
    margin = torch.empty(B, B)
    for t in range(B):
        for v in range(B):
            lg = model.itm_logits(text_tokens[t : t + 1], mask[t : t + 1], image_tokens[v : v + 1])[0]
            margin[t, v] = lg[1] - lg[0]
    eye = torch.eye(B)
    want = (L.soft_cross_entropy(margin, eye) + L.soft_cross_entropy(margin.t(), eye)) / 2
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    fusion = model.text_encoder.encoder.layer[model.config.text.fusion_layer]
    assert fusion.crossattention.self.query.weight.grad.abs().sum() > 0
    out = obj(image, ids, mask, torch.arange(B), alpha=0.0)
    assert out["loss_itm_pairs"] > 0
    plain = AlbefObjective(model, queue_size=8)
    assert plain(image, ids, mask, torch.arange(B), alpha=0.0)["loss_itm_pairs"] == 0
