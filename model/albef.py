"""The ALBEF model for retrieval: unimodal encoders, ITC projections, the fusion encoder and the ITM head.

Inference API (all in eval mode, float32 unless the caller casts):
- ``encode_image(pixels) -> (embedding [B, D] L2-normalised, tokens [B, N, W])``
- ``encode_text(ids, mask) -> (embedding [B, D], tokens [B, L, H])``
- ``itm_logits(text_tokens, text_mask, image_tokens) -> [B, 2]`` (class 1 = match)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.model.bert import BertModel, ImageKV
from albef.model.config import AlbefConfig
from albef.model.vit import build_vit


class ALBEF(nn.Module):
    def __init__(self, config: AlbefConfig, with_mlm: bool = False) -> None:
        super().__init__()
        self.config = config
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.visual_encoder = build_vit(config.vision)
        self.text_encoder = BertModel(config.text, with_mlm=with_mlm)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)

    @property
    def with_mlm(self) -> bool:
        return hasattr(self.text_encoder, "cls")

    def image_tokens(self, pixels: Tensor) -> Tensor:
        return self.visual_encoder.forward_features(pixels)

    def encode_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.image_tokens(pixels)
        return F.normalize(self.vision_proj(tokens[:, 0, :]), dim=-1), tokens

    def encode_text(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.text_encoder(ids, mask, mode="text")
        return F.normalize(self.text_proj(tokens[:, 0, :]), dim=-1), tokens

    def fusion(
        self,
        text_tokens: Tensor,
        text_mask: Tensor,
        image_tokens: Tensor | None = None,
        image_kv: ImageKV | None = None,
    ) -> Tensor:
        return self.text_encoder(
            attention_mask=text_mask,
            encoder_embeds=text_tokens,
            image_tokens=image_tokens,
            image_kv=image_kv,
            mode="fusion",
        )

    def multi_modal(self, ids: Tensor, mask: Tensor, image_tokens: Tensor) -> Tensor:
        return self.text_encoder(ids, mask, image_tokens=image_tokens, mode="multi_modal")

    def itm_logits(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        return self.itm_head(self.fusion(text_tokens, text_mask, image_tokens)[:, 0, :])

    def image_kv(self, image_tokens: Tensor) -> ImageKV:
        return self.text_encoder.image_kv(image_tokens)

    def itm_logits_kv(self, text_tokens: Tensor, text_mask: Tensor, image_kv: ImageKV) -> Tensor:
        """ITM logits with the image side's cross-attention K/V precomputed (batch 1 broadcasts)."""
        return self.itm_head(self.fusion(text_tokens, text_mask, image_kv=image_kv)[:, 0, :])

    def mlm_logits(self, ids: Tensor, mask: Tensor, image_tokens: Tensor) -> Tensor:
        if not self.with_mlm:
            raise RuntimeError("this model was built without the MLM head (with_mlm=False)")
        return self.text_encoder.cls(self.multi_modal(ids, mask, image_tokens))

    def num_parameters(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        return {
            "visual_encoder": count(self.visual_encoder),
            "text_encoder": count(self.text_encoder),
            "heads": count(self.vision_proj) + count(self.text_proj) + count(self.itm_head) + 1,
            "total": count(self),
        }
