"""A training objective for data whose truth is known (the synthetic world): ITC and ITM on truth labels.

ALBEF's own objective (:mod:`albef.model.train.objective`) knows one positive per caption, its annotated
image, and mines ITM negatives from ITC similarities. From random weights on the synthetic world that leaves
the ITM head at the "no match" prior and never teaches the fusion to bind attributes and relations
(docs/model.md §6). When the generator's semantics say which caption is true of which image, every in-batch
pair can be labelled instead:

- **ITC**: the two-sided in-batch contrastive loss, each caption's positives being every batch image it is
  true of (no momentum encoders, no queue);
- **ITM**: each caption against its image's group-mates in the batch (its swap-mates: the same objects with
  one relation or attribute changed, false by construction) and ``random_negatives`` other batch images;
  a softmax over those candidates' match margins (logit 1 - logit 0) plus a class-balanced binary loss on
  every pair whose truth is known. Pairs where a relation is ambiguous are left out of the binary loss.

The model, its heads and what is exported are ALBEF's; only the labels differ. Batches must hold whole
groups (:class:`albef.model.train.dataset.GroupBatches`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.model.albef import ALBEF
from albef.model.train.losses import masked_soft_cross_entropy

# The in-batch ITC temperature's range (the parameter itself is left free, as in the official retrieval).
TEMP_RANGE = (0.01, 0.5)


def itm_candidates(group: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """[B, n] image indices for each caption (row = its own image): every group-mate in the batch (itself
    included) first, then random other images. ``n`` is capped at B."""
    B = group.shape[0]
    same = group[:, None] == group[None, :]
    noise = torch.rand(B, B, generator=generator, device=group.device)
    return (same.float() * 2.0 + noise).topk(min(n, B), dim=1).indices


class TruthObjective(nn.Module):
    def __init__(self, model: ALBEF, random_negatives: int = 4, group_size: int = 4) -> None:
        super().__init__()
        if random_negatives < 0:
            raise ValueError(f"random_negatives must be >= 0, not {random_negatives!r}")
        self.model = model
        self.n_candidates = group_size + int(random_negatives)

    def extra_state(self) -> dict[str, object]:
        """What a checkpoint holds besides the model (nothing: no momentum encoders, no queues)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def forward(
        self, image: Tensor, ids: Tensor, mask: Tensor, true: Tensor, false: Tensor, group: Tensor
    ) -> dict[str, Tensor]:
        """Losses of one batch (``loss``, ``loss_itc``, ``loss_itm``; ``loss_itm_pairs`` is ITM's softmax
        part, ``itm_acc`` how often the top candidate is a true one).

        ``true``/``false`` [B texts, B images] bool: caption t is (clearly) true / false of image j; caption
        t belongs to image t. ``group`` [B]: each image's scene group.
        """
        m = self.model
        B = image.shape[0]
        image_feat, image_tokens = m.encode_image(image)
        text_feat, text_tokens = m.encode_text(ids, mask)
        pos = true.float()
        sim = text_feat.float() @ image_feat.float().t() / m.temp.clamp(*TEMP_RANGE)
        loss_itc = (masked_soft_cross_entropy(sim, pos) + masked_soft_cross_entropy(sim.t(), pos.t())) / 2

        cand = itm_candidates(group, self.n_candidates)
        n = cand.shape[1]
        t_idx = torch.arange(B, device=image.device).repeat_interleave(n)
        v_idx = cand.reshape(-1)
        kv = [(k[v_idx], v[v_idx]) for k, v in m.image_kv(image_tokens)]  # each image's K/V computed once
        logits = m.itm_head(m.fusion(text_tokens[t_idx], mask[t_idx], image_kv=kv)[:, 0, :]).float()
        label = pos[t_idx, v_idx]
        known = (true | false)[t_idx, v_idx].float()
        margin = (logits[:, 1] - logits[:, 0]).view(B, n)
        loss_softmax = masked_soft_cross_entropy(margin, label.view(B, n))
        # Positives weigh as much as all the negatives of a row together.
        weight = known * torch.where(label > 0, float(n - 1), 1.0)
        loss_binary = (
            F.cross_entropy(logits, label.long(), reduction="none") * weight
        ).sum() / weight.sum().clamp_min(1.0)
        loss_itm = loss_softmax + loss_binary
        with torch.no_grad():
            top = cand.gather(1, margin.argmax(1, keepdim=True)).squeeze(1)
            itm_acc = true[torch.arange(B, device=image.device), top].float().mean()
        zero = loss_itc.new_zeros(())
        return {
            "loss": loss_itc + loss_itm,
            "loss_itc": loss_itc,
            "loss_itm": loss_itm,
            "loss_itm_pairs": loss_softmax.detach(),
            "loss_mlm": zero,
            "itm_acc": itm_acc,
            "n_neg": torch.tensor(float(B * (n - 1))),
        }
