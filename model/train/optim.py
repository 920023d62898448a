"""AdamW with the official weight-decay groups and the cosine schedule with warm-up, counted in steps.

``optim/optim_factory.py:create_optimizer``: weight decay for every trainable parameter except those with
``len(shape) == 1`` or a name ending in ``.bias`` (so LayerNorm weights and biases are excluded, while the
0-d ``temp``, ``pos_embed`` and ``cls_token`` do get decay). Frozen (momentum) parameters are skipped.

``scheduler/cosine_lr.py`` with ``warmup_prefix=True`` counts in epochs (warm-up in 100-iteration units).
We count in optimizer steps so tiny runs of a few hundred steps get the same shape: linear warm-up from
``warmup_lr`` to ``lr`` over ``warmup_steps``, then ``min_lr + 0.5 (lr - min_lr)(1 + cos(pi t / T))`` with
``t`` the steps after warm-up and ``T`` the remaining steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, lr_mult: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Decay / no-decay groups; ``lr_mult`` maps name prefixes to a learning-rate factor (default 1)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (len(p.shape) == 1 or name.endswith(".bias"))
        mult = next((m for prefix, m in (lr_mult or {}).items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, float(mult)), []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[1]))
    return [
        {"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_mult": k[1]} for k in order
    ]


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.02,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    lr_mult: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on this small model.
    return torch.optim.AdamW(
        param_groups(model, weight_decay, lr_mult), lr=lr, betas=betas, eps=eps, fused=True
    )


def cosine_lr(
    step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int, warmup_lr: float
) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / span))


class CosineWarmup:
    """Sets the lr of every param group before each optimizer step; its state is the step counter."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        lr: float,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        warmup_lr: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(lr if warmup_lr is None else warmup_lr)
        self.step_count = 0
        self._apply()

    def current(self) -> float:
        return cosine_lr(
            self.step_count, self.total_steps, self.lr, self.min_lr, self.warmup_steps, self.warmup_lr
        )

    def _apply(self) -> None:
        lr = self.current()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
