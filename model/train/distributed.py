"""The process-group side of training (``torchrun`` DDP) and the from-scratch initialisation."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from albef.model.train.momentum import world_size

__all__ = ["barrier", "init_weights", "setup_distributed"]


def setup_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def init_weights(model: nn.Module) -> None:
    """BERT-style initialisation (HF ``_init_weights``) of the text side and the heads for training from
    scratch: normal(0, 0.02) for Linear and Embedding, zero biases and padding row, LayerNorm 1/0.
    timm initialises the ViT itself (truncated normal 0.02)."""
    for part in (model.text_encoder, model.vision_proj, model.text_proj, model.itm_head):
        for m in part.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
