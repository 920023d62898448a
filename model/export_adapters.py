"""The five exported inference paths of :class:`ALBEF` as ``nn.Module`` adapters, their example inputs and
the input/output description the manifest records.

Each adapter takes and returns plain tensors, which is what the ONNX tracer needs; the model's own methods
do the work, so a graph computes what PyTorch computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from albef.model.albef import ALBEF

__all__ = [
    "ImageEncoderAdapter",
    "TextEncoderAdapter",
    "ItmAdapter",
    "ImageKVAdapter",
    "ItmKVAdapter",
    "num_fusion_layers",
    "kv_names",
    "example_inputs",
    "io_description",
]


class ImageEncoderAdapter(nn.Module):
    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_image(pixels)


class TextEncoderAdapter(nn.Module):
    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_text(input_ids, attention_mask)


class ItmAdapter(nn.Module):
    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        return self.model.itm_logits(text_tokens, text_mask, image_tokens)


class ImageKVAdapter(nn.Module):
    """Image tokens -> (k0, v0, k1, v1, ...): the cross-attention keys/values of each fusion layer."""

    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for kv in self.model.image_kv(image_tokens) for t in kv)


class ItmKVAdapter(nn.Module):
    """ITM logits from text tokens and precomputed image K/V (a K/V batch of 1 broadcasts over the texts)."""

    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_tokens: Tensor, text_mask: Tensor, *kv: Tensor) -> Tensor:
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        return self.model.itm_logits_kv(text_tokens, text_mask, pairs)


def num_fusion_layers(model: ALBEF) -> int:
    cfg = model.config.text
    return cfg.num_hidden_layers - cfg.fusion_layer


def kv_names(model: ALBEF) -> list[str]:
    return [f"{kind}{i}" for i in range(num_fusion_layers(model)) for kind in ("k", "v")]


def example_inputs(
    model: ALBEF, batch: int = 2, length: int | None = None, seed: int = 0, encode_images: bool = True
) -> dict[str, Tensor]:
    """Deterministic inputs of every graph: random pixels, ids with ragged masks, and the model's own
    embeddings and token features for them (so ITM sees realistic activations)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    length = length or cfg.max_tokens
    r = cfg.vision.image_res
    pixels = torch.randn(batch, 3, r, r, generator=g)
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 101
    lengths = [length] + [max(2, length - 3 * (i + 1)) for i in range(batch - 1)]
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask
    out = {"pixels": pixels, "input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        if encode_images:
            out["image_emb"], out["image_tokens"] = model.encode_image(pixels)
        out["text_emb"], out["text_tokens"] = model.encode_text(ids, mask)
    return out


def io_description(model: ALBEF) -> dict[str, Any]:
    """Input/output names and shapes of every graph (symbolic axes as strings), for consumers."""
    cfg = model.config
    n = cfg.vision.num_patches + 1
    w, h, d = cfg.vision.width, cfg.text.hidden_size, cfg.embed_dim
    heads = cfg.text.num_attention_heads
    kv = {name: ["1", heads, n, h // heads] for name in kv_names(model)}
    r = cfg.vision.image_res
    return {
        "image_encoder": {
            "inputs": {"pixels": ["B", 3, r, r]},
            "outputs": {"image_emb": ["B", d], "image_tokens": ["B", n, w]},
        },
        "text_encoder": {
            "inputs": {"input_ids": ["B", "L"], "attention_mask": ["B", "L"]},
            "outputs": {"text_emb": ["B", d], "text_tokens": ["B", "L", h]},
        },
        "itm": {
            "inputs": {"text_tokens": ["B", "L", h], "text_mask": ["B", "L"], "image_tokens": ["B|1", n, w]},
            "outputs": {"itm_logits": ["B", 2]},
        },
        "image_kv": {"inputs": {"image_tokens": ["1", n, w]}, "outputs": kv},
        "itm_kv": {
            "inputs": {"text_tokens": ["K", "L", h], "text_mask": ["K", "L"], **kv},
            "outputs": {"itm_logits": ["K", 2]},
        },
    }
