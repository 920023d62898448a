"""The three ALBEF objectives as plain functions over tensors (docs/model.md §2.1-2.3).

Kept free of modules and state so each piece can be checked against a hand-computed case:
- ITC: targets (diagonal for pretraining, idx-based for retrieval, queue included), the momentum
  distillation mix ``alpha * softmax(s_m) + (1 - alpha) * y`` and the two-way cross-entropy.
- ITM: hard-negative sampling from the in-batch ITC softmax with positives masked, and the CE.
- MLM: 15% masking with 80/10/10 ([CLS] and [PAD] never masked) and the distilled loss.

Degenerate batches (issues #18, #93, #131 of the official code: "invalid multinomial distribution"):
a row whose every in-batch candidate is a positive (B = 1, or all items share one image) has no valid
negative. :func:`sample_hard_negatives` returns it with ``valid = False`` and the ITM negative pass simply
leaves that row out, so the ITM loss is then computed on the positives and the remaining negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- ITC


def diagonal_targets(batch: int, total: int, device: torch.device | None = None) -> Tensor:
    """Pretraining ITC targets: 1 on the in-batch diagonal, 0 on every other column (queue included)."""
    y = torch.zeros(batch, total, device=device)
    y[:, :batch].fill_diagonal_(1.0)
    return y


def idx_targets(idx: Tensor, idx_all: Tensor) -> Tensor:
    """Retrieval ITC targets: ``y_ij = 1[idx_i == idx_all_j] / sum_j 1[...]``.

    ``idx`` [B] are the batch's image indices, ``idx_all`` [B + K] the batch followed by the idx queue
    (queue slots not yet filled hold -100 and never match a real idx >= 0). The positive mass is shared
    between every column with the same image: other captions of that image in the batch or in the queue.
    """
    pos = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    return pos / pos.sum(dim=1, keepdim=True)


def distill_targets(targets: Tensor, sim_m: Tensor | None, alpha: float) -> Tensor:
    """Momentum distillation: ``alpha * softmax(sim_m) + (1 - alpha) * targets`` (targets alone when off)."""
    if sim_m is None or alpha == 0:
        return targets
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * targets


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i[-sum_j targets_ij * log_softmax(logits)_ij]``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def masked_soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """:func:`soft_cross_entropy` against each row's positives sharing the target mass equally; rows without a
    positive are left out (0 when there is none)."""
    has = positives.sum(1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return soft_cross_entropy(logits[has], positives[has] / positives[has].sum(1, keepdim=True))


def itc_loss(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    targets: Tensor,
    sim_i2t_m: Tensor | None = None,
    sim_t2i_m: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """ITC with optional momentum distillation, averaged over both directions.

    ``sim_*`` [B, B + K] are online queries against momentum keys (batch then queue) divided by temp;
    ``sim_*_m`` the same for the momentum queries. ``targets`` [B, B + K] are shared by both directions
    (the image and text queues are filled in lockstep, so column j means the same pair in both).
    """
    t_i2t = distill_targets(targets, sim_i2t_m, alpha)
    t_t2i = distill_targets(targets, sim_t2i_m, alpha)
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


# --------------------------------------------------------------------------------------------- ITM


def positive_mask(batch: int, idx: Tensor | None, device: torch.device | None = None) -> Tensor:
    """[B, B] True where the pair is a positive: same idx (retrieval) or the diagonal (pretraining)."""
    if idx is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    return idx.view(-1, 1) == idx.view(1, -1)


def hard_negative_weights(sim: Tensor, positives: Tensor) -> Tensor:
    """Sampling weights from the in-batch ITC logits [B, B]: softmax, then positives set to 0.

    The small constant is added before masking (as the official code) so that a row with at least one
    valid candidate never becomes all zeros through underflow of the softmax (tiny temp).
    """
    weights = F.softmax(sim.detach().float(), dim=1) + 1e-5
    return weights.masked_fill(positives, 0.0)


def sample_hard_negatives(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One negative per row, drawn from ``weights`` [B, B] (rows need not be normalised).

    Returns ``(index [B] long, valid [B] bool)``. Rows whose weights are all zero (no valid negative: every
    in-batch candidate shares the query's image) get ``valid = False`` and index 0, never a positive draw.
    """
    valid = weights.sum(dim=1) > 0
    index = torch.zeros(weights.shape[0], dtype=torch.long, device=weights.device)
    if bool(valid.any()):
        drawn = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
        index[valid] = drawn
    return index, valid


def group_mates(group: Tensor, positives: Tensor) -> Tensor:
    """[B, B] True where the pair is a known hard negative: same group (>= 0), not a positive."""
    same = (group.view(-1, 1) == group.view(1, -1)) & (group.view(-1, 1) >= 0)
    return same & ~positives


def mix_group_negatives(
    index: Tensor, valid: Tensor, mates: Tensor, probability: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Replace each row's negative, with ``probability``, by a uniformly drawn group-mate (rows that have one).

    Group-mates are negatives by construction (the generator checks every caption false of its swap-mates),
    so unlike ITC-mined negatives they are never false negatives, and they are exactly the pairs that only
    binding (which colour on which shape, what is left of what) can tell apart.
    """
    has = mates.any(dim=1)
    pick = has & (torch.rand(index.shape[0], generator=generator, device=index.device) < probability)
    if not bool(pick.any()):
        return index, valid
    drawn = torch.multinomial(mates[pick].float(), 1, generator=generator).squeeze(1)
    index = index.clone()
    index[pick] = drawn
    return index, valid | pick


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the [P + N, 2] ITM logits; label 1 = match."""
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------------------------- MLM


def mask_tokens(
    ids: Tensor,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    cls_id: int = 101,
    mask_id: int = 103,
) -> tuple[Tensor, Tensor]:
    """``ALBEF.mask()``: returns ``(masked_ids, labels)``.

    Each token is selected with ``probability`` ([PAD] and [CLS] never); labels hold the original id at
    selected positions and -100 elsewhere. Of the selected: 80% -> [MASK], half of the rest -> a uniform
    random id in [0, vocab_size) (special tokens included, as the official code), the rest unchanged.
    """
    ids = ids.clone()
    labels = ids.clone()
    probs = torch.full(ids.shape, probability, device=ids.device)
    selected = torch.bernoulli(probs, generator=generator).bool()
    selected &= (ids != pad_id) & (ids != cls_id)
    labels[~selected] = IGNORE_INDEX
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device), generator=generator).bool()
    replaced &= selected
    ids[replaced] = mask_id
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device), generator=generator).bool()
    randomised &= selected & ~replaced
    random_ids = torch.randint(vocab_size, ids.shape, device=ids.device, generator=generator)
    ids[randomised] = random_ids[randomised]
    return ids, labels


def mlm_loss(logits: Tensor, labels: Tensor, logits_m: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """``(1 - alpha) * CE(logits, labels) + alpha * mean_masked[-sum_v softmax(logits_m) log_softmax(logits)]``.

    ``logits`` [..., V] and ``labels`` [...] may be the full sequence or only the masked positions. The
    softmax runs over the vocabulary (the fixed form of issue #58). No masked token -> a zero loss that
    keeps the graph (the official code would return NaN).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    keep = lab != IGNORE_INDEX
    if not bool(keep.any()):
        return flat.sum() * 0.0
    flat, lab = flat[keep], lab[keep]
    loss = F.cross_entropy(flat, lab)
    if logits_m is not None and alpha > 0:
        soft = F.softmax(logits_m.reshape(-1, logits_m.shape[-1]).float()[keep], dim=-1)
        distill = -(F.log_softmax(flat, dim=-1) * soft).sum(dim=-1).mean()
        loss = (1.0 - alpha) * loss + alpha * distill
    return loss
