"""The ALBEF image encoder: timm's ``VisionTransformer`` with the official ViT-B/16 settings (docs/model.md §1.1).

timm's parameter names equal ``models/vit.py``'s, so official weights load strictly. No classifier head,
no pooling: the encoder returns all tokens after the final LayerNorm.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from albef.model.config import VisionConfig


def build_vit(cfg: VisionConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.image_res,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=cfg.eps),
        num_classes=0,
        global_pool="",
        class_token=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
    )


def interpolate_pos_embed(
    pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1
) -> torch.Tensor:
    """``models/vit.py:interpolate_pos_embed``: keep the CLS row, resize the patch grid with plain bicubic
    (``align_corners=False``, antialias off), e.g. 257 -> 577 for a 256 px checkpoint used at 384 px."""
    length, dim = pos_embed.shape[-2], pos_embed.shape[-1]
    orig = int(round((length - num_extra_tokens) ** 0.5))
    new = int(round(num_patches**0.5))
    if orig * orig != length - num_extra_tokens or new * new != num_patches:
        raise ValueError(f"pos_embed of length {length} is not CLS + a square grid")
    if orig == new:
        return pos_embed
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, grid), dim=1)
