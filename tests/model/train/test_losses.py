"""The training objectives against small hand-computed cases (docs/model.md §2.1-2.6)."""

from __future__ import annotations

import math

import pytest
import torch

from albef.model.train import losses as L
from albef.model.train.momentum import FeatureQueues, MomentumEncoders, check_queue_size
from albef.model.train.optim import CosineWarmup, cosine_lr, create_optimizer, param_groups


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def test_idx_targets_share_mass_with_queue_positives():
    idx = torch.tensor([0, 1, 0])
    idx_all = torch.tensor([0, 1, 0, 1, -100, 0, 7])  # batch, then queue (-100 = empty slot)
    y = L.idx_targets(idx, idx_all)
    third = 1 / 3
    expected = torch.tensor(
        [
            [third, 0, third, 0, 0, third, 0],
            [0, 0.5, 0, 0.5, 0, 0, 0],
            [third, 0, third, 0, 0, third, 0],
        ]
    )
    assert torch.allclose(y, expected)
    assert torch.allclose(y.sum(1), torch.ones(3))


def test_diagonal_targets_ignore_queue():
    y = L.diagonal_targets(2, 5)
    assert y.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]


def test_itc_loss_with_distillation_matches_hand_computation():
    s_i2t = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]]
    s_t2i = [[1.0, 0.0, 0.2], [-0.5, 2.5, 0.0]]
    m_i2t = [[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
    m_t2i = [[0.5, 0.5, 0.5], [0.0, 1.0, -1.0]]
    y = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    alpha = 0.4

    def direction(s, sm):
        total = 0.0
        for row, mrow, yrow in zip(s, sm, y, strict=True):
            p = _softmax(mrow)
            target = [alpha * pi + (1 - alpha) * yi for pi, yi in zip(p, yrow, strict=True)]
            lse = math.log(sum(math.exp(v) for v in row))
            total += -sum(t * (v - lse) for t, v in zip(target, row, strict=True))
        return total / len(s)

    expected = (direction(s_i2t, m_i2t) + direction(s_t2i, m_t2i)) / 2
    t = torch.tensor
    got = L.itc_loss(t(s_i2t), t(s_t2i), t(y), t(m_i2t), t(m_t2i), alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0 (or no momentum logits) is the plain soft cross-entropy with the hard targets
    plain = L.itc_loss(t(s_i2t), t(s_t2i), t(y), t(m_i2t), t(m_t2i), 0.0)
    no_m = L.itc_loss(t(s_i2t), t(s_t2i), t(y))
    assert plain.item() == pytest.approx(no_m.item())
    assert plain.item() != pytest.approx(got.item())


def test_hard_negatives_never_positive_and_degenerate_rows_flagged():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    sim = torch.randn(8, 8) * 5
    positives = L.positive_mask(8, idx)
    w = L.hard_negative_weights(sim, positives)
    for _ in range(200):
        neg, valid = L.sample_hard_negatives(w)
        assert valid.all()
        assert (idx[neg] != idx).all()
    # every item shares one image: no valid negative anywhere, and no crash
    same = torch.zeros(4, dtype=torch.long)
    neg, valid = L.sample_hard_negatives(L.hard_negative_weights(torch.randn(4, 4), L.positive_mask(4, same)))
    assert not valid.any()
    # pretraining masks the diagonal only
    assert L.positive_mask(3, None).tolist() == [
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]


def test_hard_negative_sampling_follows_the_softmax():
    sim = torch.tensor([[0.0, math.log(3.0), 0.0]])  # candidates 1 and 2 (0 is the positive): 3:1
    w = L.hard_negative_weights(sim, torch.tensor([[True, False, False]]))
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([L.sample_hard_negatives(w, g)[0] for _ in range(2000)])
    assert (draws != 0).all()
    assert (draws == 1).float().mean().item() == pytest.approx(0.75, abs=0.04)


def test_mask_tokens_ratios_and_protected_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (400, 30), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[:, 20:] = 0  # [PAD]
    masked, labels = L.mask_tokens(ids, 30522, 0.15, generator=g)
    sel = labels != L.IGNORE_INDEX
    assert not sel[:, 0].any() and not sel[:, 20:].any()
    assert (masked[:, 0] == 101).all() and (masked[:, 20:] == 0).all()
    assert torch.equal(labels[sel], ids[sel])
    assert torch.equal(masked[~sel], ids[~sel])
    rate = sel[:, 1:20].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = sel.sum().item()
    to_mask = ((masked == 103) & sel).sum().item() / n
    unchanged = ((masked == ids) & sel).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert unchanged == pytest.approx(0.1, abs=0.02)  # + the rare random draw equal to the original id
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.02)


def test_mlm_loss_with_distillation_matches_hand_computation():
    logits = [[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]
    teacher = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    labels = [1, 0, L.IGNORE_INDEX]  # the third position is not masked
    alpha = 0.4
    ce = distill = 0.0
    for row, trow, lab in zip(logits[:2], teacher[:2], labels[:2], strict=True):
        lse = math.log(sum(math.exp(v) for v in row))
        ce += -(row[lab] - lse)
        distill += -sum(p * (v - lse) for p, v in zip(_softmax(trow), row, strict=True))
    expected = (1 - alpha) * ce / 2 + alpha * distill / 2
    t = torch.tensor
    assert L.mlm_loss(t(logits), t(labels), t(teacher), alpha).item() == pytest.approx(expected, rel=1e-6)
    assert L.mlm_loss(t(logits), t([L.IGNORE_INDEX] * 3)).item() == 0.0  # nothing masked: zero, not NaN


def test_itm_loss_is_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([1, 0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert L.itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
            setattr(self, name, torch.nn.Linear(2, 2))


def test_ema_update_formula():
    torch.manual_seed(0)
    model = _Toy()
    mom = MomentumEncoders(model)
    before = mom.vision_proj_m.weight.clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    mom.update(model, 0.9)
    assert torch.allclose(mom.vision_proj_m.weight, 0.9 * before + 0.1 * model.vision_proj.weight)
    assert not any(p.requires_grad for p in mom.parameters())


def test_queue_enqueue_wraps_and_checks_divisibility():
    q = FeatureQueues(embed_dim=3, size=4)
    a = torch.eye(3)[:2]
    q.enqueue(a, a * 2, torch.tensor([5, 6]))
    assert int(q.queue_ptr) == 2
    assert torch.equal(q.image_queue[:, :2], a.T) and torch.equal(q.text_queue[:, :2], 2 * a.T)
    assert q.idx_queue[0].tolist() == [5, 6, -100, -100]
    q.enqueue(a, a, torch.tensor([7, 8]))
    assert int(q.queue_ptr) == 0 and q.idx_queue[0].tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="divisible by the global batch"):
        q.enqueue(torch.eye(3), torch.eye(3), torch.arange(3))
    with pytest.raises(ValueError, match="65536 must be divisible by the global batch 96"):
        check_queue_size(65536, 96)


def test_weight_decay_groups_follow_the_official_rule():
    from albef.model.factory import create_model

    model = create_model("albef-tiny")
    groups = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.02 and groups[1]["weight_decay"] == 0.0
    assert {"temp", "visual_encoder.pos_embed", "visual_encoder.cls_token", "itm_head.weight"} <= decayed
    assert "text_encoder.embeddings.LayerNorm.weight" in plain and "itm_head.bias" in plain
    assert all(n.endswith(".bias") or model.get_parameter(n).dim() == 1 for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_cosine_schedule_with_warmup():
    assert cosine_lr(0, 100, 1e-3, 1e-5, 10, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(5, 100, 1e-3, 1e-5, 10, 1e-4) == pytest.approx(5.5e-4)
    assert cosine_lr(10, 100, 1e-3, 1e-5, 10, 1e-4) == pytest.approx(1e-3)
    assert cosine_lr(55, 100, 1e-3, 1e-5, 10, 1e-4) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(100, 100, 1e-3, 1e-5, 10, 1e-4) == pytest.approx(1e-5)
    opt = create_optimizer(torch.nn.Linear(2, 2), lr=1e-3)
    sched = CosineWarmup(opt, 100, 1e-3, 1e-5, 10, 1e-4)
    for _ in range(5):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5.5e-4)
    again = CosineWarmup(opt, 100, 1e-3, 1e-5, 10, 1e-4)
    again.load_state_dict(sched.state_dict())
    assert opt.param_groups[1]["lr"] == pytest.approx(5.5e-4)


def _tiny_objective(**kw):
    from albef.model.factory import create_model
    from albef.model.train.objective import AlbefObjective

    torch.manual_seed(0)
    model = create_model("albef-tiny", image_res=32)
    return AlbefObjective(model, **kw)


def _batch(b: int = 4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (b, 6), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    ids[0, 4:] = 0
    return torch.randn(b, 3, 32, 32, generator=g), ids, mask


def test_objective_ema_before_momentum_forward_and_enqueue_after_loss():
    obj = _tiny_objective(queue_size=8, momentum=0.0)
    obj.eval()  # no dropout, so online and momentum features can be compared exactly
    with torch.no_grad():  # make the online model differ from its momentum copy
        for p in obj.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    image, ids, mask = _batch()
    idx = torch.tensor([3, 3, 4, 5])
    with torch.no_grad():
        obj.queues.idx_queue[0, :4] = torch.tensor([3, 9, 9, 9])
    queue_img, queue_txt = obj.queues.image_queue.clone(), obj.queues.text_queue.clone()
    queue_idx = obj.queues.idx_queue.clone()
    out = obj(image, ids, mask, idx, alpha=0.0)
    with torch.no_grad():
        v, _ = obj.model.encode_image(image)
        w, _ = obj.model.encode_text(ids, mask)
    # momentum 0 and the EMA update first: the momentum features equal the (updated) online ones
    assert torch.allclose(out["image_feat_m"], v, atol=1e-6)
    assert torch.allclose(out["text_feat_m"], w, atol=1e-6)
    # the loss saw the queue as it was before this batch; the batch was written afterwards
    temp = obj.model.temp.detach()
    img_all = torch.cat([v.T, queue_img], 1)
    txt_all = torch.cat([w.T, queue_txt], 1)
    y = L.idx_targets(idx, torch.cat([idx.view(1, -1), queue_idx], 1))
    assert y[0, :5].tolist() == pytest.approx(
        [1 / 3, 1 / 3, 0, 0, 1 / 3]
    )  # two batch positives + one in the queue
    expected = L.itc_loss(v @ txt_all / temp, w @ img_all / temp, y)
    assert out["loss_itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(obj.queues.image_queue[:, :4], v.T, atol=1e-6)
    assert obj.queues.idx_queue[0].tolist() == [3, 3, 4, 5, -100, -100, -100, -100]
    assert int(obj.queues.queue_ptr) == 4
    assert out["n_neg"].item() == 8  # every row has a valid negative


def test_objective_batch_of_one_image_does_not_crash():
    obj = _tiny_objective(queue_size=8)
    obj.train()
    image, ids, mask = _batch()
    out = obj(image, ids, mask, torch.zeros(4, dtype=torch.long), alpha=0.4)
    assert out["n_neg"].item() == 0  # no valid negative: the ITM loss is on the positives only
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert obj.model.itm_head.weight.grad is not None


def test_pretrain_mode_clamps_temp_and_runs_mlm():
    from albef.model.factory import create_model
    from albef.model.train.objective import AlbefObjective

    torch.manual_seed(0)
    model = create_model("albef-tiny", image_res=32, with_mlm=True)
    with torch.no_grad():
        model.temp.fill_(0.9)
    obj = AlbefObjective(model, mode="pretrain", queue_size=8, mlm=True)
    image, ids, mask = _batch()
    out = obj(image, ids, mask, torch.arange(4), alpha=0.4)
    assert model.temp.item() == pytest.approx(0.5)
    assert out["loss_mlm"].item() > 0
    out["loss"].backward()
    assert model.text_encoder.cls.predictions.transform.dense.weight.grad is not None
    # retrieval mode does not clamp
    retr = _tiny_objective(queue_size=8)
    with torch.no_grad():
        retr.model.temp.fill_(0.9)
    retr(image, ids, mask, torch.arange(4), alpha=0.4)
    assert retr.model.temp.item() == pytest.approx(0.9)


def test_scratch_warmup_is_two_sided_in_batch_itc_and_leaves_the_queue_alone():
    obj = _tiny_objective(queue_size=8)
    obj.eval()
    image, ids, mask = _batch()
    idx = torch.tensor([0, 0, 1, 2])
    before = obj.queues.image_queue.clone()
    out = obj(image, ids, mask, idx, alpha=0.4, warmup=True)
    v, _ = obj.model.encode_image(image)
    w, _ = obj.model.encode_text(ids, mask)
    s = v @ w.T / obj.model.temp
    expected = L.itc_loss(s, s.T, L.idx_targets(idx, idx))
    assert out["loss_itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss_itm"].item() == 0.0 and out["loss"].item() == pytest.approx(out["loss_itc"].item())
    assert torch.equal(obj.queues.image_queue, before) and int(obj.queues.queue_ptr) == 0
    out["loss"].backward()  # both towers receive gradients (no stop-gradient on the keys)
    assert (
        obj.model.text_proj.weight.grad.abs().sum() > 0 and obj.model.vision_proj.weight.grad.abs().sum() > 0
    )


def test_lr_factor_for_fusion_groups_follows_the_schedule():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "itm_head": torch.nn.Linear(2, 2)})
    opt = create_optimizer(model, lr=1e-3, lr_mult={"itm_head.": 3.0})
    sched = CosineWarmup(opt, 10, 1e-3, 0.0, 0, None)
    lrs = {(g["weight_decay"] > 0, g["lr_mult"]): g["lr"] for g in opt.param_groups}
    assert lrs == {(True, 1.0): 1e-3, (False, 1.0): 1e-3, (True, 3.0): 3e-3, (False, 3.0): 3e-3}
    sched.step()
    assert opt.param_groups[-1]["lr"] == pytest.approx(3 * cosine_lr(1, 10, 1e-3, 0.0, 0, 1e-3))
