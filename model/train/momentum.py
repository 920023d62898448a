"""Momentum (EMA) encoders, the feature queues and the all-gather that fills them (docs/model.md §2.1).

The momentum copies are ``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m``, ``text_proj_m``
(official names), created as deep copies of the online modules and never trained by gradients. The queues
hold the momentum features of past batches, written after the loss, ``G * B`` columns at a time
(all-gathered over the G ranks so every rank holds the same queue); ``K % (G * B) == 0`` is required so a
write never wraps around.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ONLINE_NAMES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); identity in a single process.

    Gradients do not flow through it (the official ``concat_all_gather``); the queues only hold momentum
    features, which have none.
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class MomentumEncoders(nn.Module):
    """EMA copies of the four online modules of an ALBEF model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ONLINE_NAMES:
            module = copy.deepcopy(getattr(model, name))
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, f"{name}_m", module)

    def pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(model, name), getattr(self, f"{name}_m")) for name in ONLINE_NAMES]

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        for online, momentum in self.pairs(model):
            for p, pm in zip(online.parameters(), momentum.parameters(), strict=True):
                pm.copy_(p.detach())

    @torch.no_grad()
    def update(self, model: nn.Module, m: float) -> None:
        """``theta_m = m * theta_m + (1 - m) * theta`` over the zipped parameters (tied ones once)."""
        for online, momentum in self.pairs(model):
            for p, pm in zip(online.parameters(), momentum.parameters(), strict=True):
                pm.mul_(m).add_(p.detach(), alpha=1.0 - m)

    def image_feat(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.visual_encoder_m.forward_features(pixels)
        return F.normalize(self.vision_proj_m(tokens[:, 0, :]), dim=-1), tokens

    def text_feat(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.text_encoder_m(ids, mask, mode="text")
        return F.normalize(self.text_proj_m(tokens[:, 0, :]), dim=-1), tokens


class FeatureQueues(nn.Module):
    """``image_queue``/``text_queue`` [D, K] (randn, L2-normalised along D), ``idx_queue`` [1, K] (-100),
    ``queue_ptr`` [1]."""

    def __init__(self, embed_dim: int, size: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = int(size)
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor) -> None:
        """All-gather this step's momentum features and idx of every rank and write them at ``queue_ptr``."""
        image_feats = concat_all_gather(image_feat.float())
        text_feats = concat_all_gather(text_feat.float())
        idxs = concat_all_gather(idx.long())
        n = image_feats.shape[0]
        check_queue_size(self.size, n)
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + n] = image_feats.T
        self.text_queue[:, ptr : ptr + n] = text_feats.T
        self.idx_queue[:, ptr : ptr + n] = idxs.view(1, -1)
        self.queue_ptr[0] = (ptr + n) % self.size


def check_queue_size(queue_size: int, global_batch: int) -> None:
    if queue_size % global_batch:
        raise ValueError(
            f"queue_size {queue_size} must be divisible by the global batch {global_batch} "
            "(per-process batch x number of processes), so that every enqueue fills whole columns"
        )
