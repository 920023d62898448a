"""The exported inference paths of :class:`ALBEF` as ``nn.Module`` adapters, their example inputs and the
input/output description the manifest records.

Each adapter takes and returns plain tensors, which is what the ONNX tracer needs. The encoders and
``image_kv`` call the model's own methods. The ITM adapters use the model's own modules too, arranged to do
only the arithmetic the result needs (:mod:`albef.model.itm_flops`): the last fusion layer computes its
[CLS] row only, image->text packs its texts' real tokens, and text->image can run its cross-attention in the
bilinear form (no image keys or values). They equal ``model.itm_logits`` up to float rounding (the export
validates it, the tests check it on the tiny and the base configuration).

Which text->image graphs a bundle holds (:func:`itm_forms`): ``itm`` in the form cheaper at the full text
length, and, when the other form is cheaper for shorter texts, ``itm_short`` in that form with the longest
length it serves. The runtime trims each batch to its longest real text and picks by that length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from albef.model.albef import ALBEF
from albef.model.bert import BertAttention, BertLayer, extended_attention_mask
from albef.model.itm_flops import bilinear_max_length, dims_of

ITM_FORMS = ("kv", "bilinear")

__all__ = [
    "ImageEncoderAdapter",
    "TextEncoderAdapter",
    "ItmAdapter",
    "BilinearCrossAttention",
    "ITM_FORMS",
    "itm_forms",
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


class BilinearCrossAttention(nn.Module):
    """A fusion layer's cross-attention sub-block without keys or values (:mod:`albef.model.itm_flops`).

    Per head ``scores_h = (Q_h W_k,h / sqrt(d)) X^T`` (the key bias adds a constant per query row, which
    softmax ignores) and ``out_h = (P_h X) W_v,h^T + b_v`` (the rows of ``P_h`` sum to one): the same result
    as the module it wraps up to float rounding, with a cost that grows with text rows x heads instead of image
    tokens. ``x`` ``[B|1, L, H]``, image tokens ``[B|1, N, W]`` (a batch of 1 broadcasts)."""

    def __init__(self, attention: BertAttention) -> None:
        super().__init__()
        sa = attention.self
        self.heads, self.head_dim = sa.num_heads, sa.head_dim
        h, d = self.heads, self.head_dim
        width = sa.key.in_features
        self.query = sa.query
        self.output = attention.output
        with torch.no_grad():
            # per head: W_k,h [d, W] scaled by 1/sqrt(d); W_v,h^T [W, d]
            wk = (sa.key.weight / math.sqrt(d)).reshape(h, d, width).clone()
            wv = sa.value.weight.reshape(h, d, width).transpose(1, 2).contiguous()
        self.register_buffer("wk", wk, persistent=False)
        self.register_buffer("wv", wv, persistent=False)
        self.register_buffer("bv", sa.value.bias.detach().clone(), persistent=False)

    def forward(self, x: Tensor, image_tokens: Tensor) -> Tensor:
        b, length, hidden = x.shape
        h, d = self.heads, self.head_dim
        n, width = image_tokens.shape[1], image_tokens.shape[2]
        # The per-head weight products run as one GEMM per head over all rows ([h, bL, .]), the image products
        # as one GEMM per image over all heads ([B, hL, .]); the two layouts are swapped by transposes.
        q = self.query(x).view(-1, h, d).transpose(0, 1)  # [h, bL, d]
        qk = torch.matmul(q, self.wk)  # [h, bL, W]
        qk = qk.view(h, -1, length, width).transpose(0, 1).reshape(-1, h * length, width)  # [b, hL, W]
        scores = torch.matmul(qk, image_tokens.transpose(1, 2))  # [B, hL, N]
        probs = torch.softmax(scores.view(-1, h, length, n), dim=-1)
        px = torch.matmul(probs.view(-1, h * length, n), image_tokens)  # [B, hL, W]
        px = px.view(-1, h, length, width).transpose(0, 1).reshape(h, -1, width)  # [h, BL, W]
        ctx = torch.matmul(px, self.wv)  # [h, BL, d]
        ctx = ctx.view(h, -1, length, d).permute(1, 2, 0, 3).reshape(-1, length, hidden) + self.bv
        return self.output(ctx, x)


def _cls_self_attention(layer: BertLayer, x: Tensor, ext: Tensor) -> Tensor:
    """The last fusion layer's self-attention sub-block for the [CLS] row only (every row a key/value)."""
    sa = layer.attention.self
    cls = x[:, :1]
    return layer.attention.output(sa(cls, ext, None, sa.key_value(x)), cls)


class ItmAdapter(nn.Module):
    """Text->image ITM: text tokens ``[B|1, L, H]``, mask, image tokens ``[B|1, N, W]`` -> logits ``[B, 2]``.

    ``form`` is the cross-attention of every fusion layer but the last (``kv``: the model's own modules;
    ``bilinear``: :class:`BilinearCrossAttention`); the last layer computes only its [CLS] row, whose
    cross-attention is always bilinear (one query row). A text batch of 1 is shared by the image batch, so
    the first fusion layer's self-attention and queries are computed once. Same logits as
    ``model.itm_logits`` up to float rounding."""

    def __init__(self, model: ALBEF, form: str = "kv") -> None:
        super().__init__()
        if form not in ITM_FORMS:
            raise ValueError(f"form must be one of {ITM_FORMS}, not {form!r}")
        self.model = model
        self.form = form
        layers = model.text_encoder.fusion_layers
        if not layers:
            raise ValueError("the model has no fusion layers (fusion_layer == num_hidden_layers)")
        keep = range(len(layers)) if form == "bilinear" else [len(layers) - 1]
        self.bilinear = nn.ModuleDict(
            {str(i): BilinearCrossAttention(layers[i].crossattention) for i in keep}
        )

    def forward(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        layers = self.model.text_encoder.fusion_layers
        ext = extended_attention_mask(text_mask, text_tokens.dtype)
        x = text_tokens
        for i, layer in enumerate(layers[:-1]):
            x = layer.attention(x, ext)
            if self.form == "bilinear":
                x = self.bilinear[str(i)](x, image_tokens)
            else:
                x = layer.crossattention(x, None, image_tokens)
            x = layer.output(layer.intermediate(x), x)
        last = layers[-1]
        x = _cls_self_attention(last, x, ext)
        x = self.bilinear[str(len(layers) - 1)](x, image_tokens)
        x = last.output(last.intermediate(x), x)
        return self.model.itm_head(x[:, 0])


class ImageKVAdapter(nn.Module):
    """Image tokens -> (k0, v0, k1, v1, ...): the cross-attention keys/values of each fusion layer."""

    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for kv in self.model.image_kv(image_tokens) for t in kv)


def _packed_cross_attention(attention: BertAttention, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Cross-attention of packed text rows ``[T, H]`` against ONE image's keys/values ``[1, heads, N, d]``."""
    sa = attention.self
    h, d = sa.num_heads, sa.head_dim
    q = sa.query(x).view(-1, h, d).transpose(0, 1)  # [h, T, d]
    # [1, h, N, d] -> [h, N, d] with a constant shape, which ONNX Runtime runs as a view (indexing [0] or
    # squeeze(0) of the dynamic batch axis is exported as a Gather or an If, each a copy of K and V per call)
    k, v = k.reshape(h, -1, d), v.reshape(h, -1, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)  # [h, T, N]
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [h, T, d]
    return attention.output(ctx.transpose(0, 1).reshape(x.shape), x)


def _scores(q: Tensor, k: Tensor, d: int) -> Tensor:
    """``q k^T / sqrt(d)`` of ``[B, h, Lq, d]`` against ``[B, h, Lk, d]``, through 3-D views: ONNX Runtime
    would merge the head transpose and the key transpose of 4-D operands into one transpose that moves single
    floats (0.5-0.6 ms per base layer); with a reshape between them the matmul takes the key transposed."""
    b, h, lq, _ = q.shape
    scores = torch.matmul(q.reshape(b * h, lq, d), k.reshape(b * h, -1, d).transpose(1, 2)) / math.sqrt(d)
    return scores.view(b, h, lq, -1)


class ItmKVAdapter(nn.Module):
    """Image->text ITM from ONE image's precomputed K/V (batch 1, broadcast over the texts).

    Inputs as before (text tokens ``[K, L, H]``, mask ``[K, L]``, k0, v0, ...), but no padded row is
    computed: the real tokens (mask 1) are packed into ``[T, H]`` for every token-wise product (projections,
    cross-attention against the one image, FFN) and only the self-attention scores use the ``[K, L]``
    layout (padding points at the text's [CLS] row and is masked as a key; its outputs are never read back).
    The last fusion layer computes only the [CLS] rows. Every text's first position must be real ([CLS]).
    Same logits as ``model.itm_logits_kv`` up to float rounding."""

    def __init__(self, model: ALBEF) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_tokens: Tensor, text_mask: Tensor, *kv: Tensor) -> Tensor:
        layers = self.model.text_encoder.fusion_layers
        hidden = text_tokens.shape[2]
        mask = text_mask
        real = torch.nonzero(mask.reshape(-1)).reshape(-1)  # packed row -> flat [K*L] position
        x = text_tokens.reshape(-1, hidden).index_select(0, real)  # [T, H]
        lengths = mask.sum(1)
        starts = torch.cumsum(lengths, 0) - lengths  # each text's [CLS] row in the packed layout
        # flat [K*L] position -> packed row; padding -> the text's [CLS] (masked as a key, never read back)
        rank = (torch.cumsum(mask, 1) - 1).clamp(min=0) * mask
        gather = (starts.unsqueeze(1) + rank).reshape(-1)
        ext = extended_attention_mask(mask, text_tokens.dtype)  # [K, 1, 1, L]
        shape = mask.shape

        def padded(t: Tensor, heads: int, d: int) -> Tensor:  # [T, H] -> [K, heads, L, d]
            return t.index_select(0, gather).view(shape[0], shape[1], heads, d).transpose(1, 2)

        for i, layer in enumerate(layers[:-1]):
            att = layer.attention
            sa = att.self
            h, d = sa.num_heads, sa.head_dim
            q, k, v = (padded(lin(x), h, d) for lin in (sa.query, sa.key, sa.value))
            scores = _scores(q, k, d) + ext
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)  # [K, L, h, d]
            ctx = ctx.reshape(-1, hidden).index_select(0, real)
            x = att.output(ctx, x)
            x = _packed_cross_attention(layer.crossattention, x, kv[2 * i], kv[2 * i + 1])
            x = layer.output(layer.intermediate(x), x)
        last = layers[-1]
        sa = last.attention.self
        h, d = sa.num_heads, sa.head_dim
        cls = x.index_select(0, starts)  # [K, H]
        q = sa.query(cls).view(-1, h, 1, d)  # [K, h, 1, d]
        scores = _scores(q, padded(sa.key(x), h, d), d) + ext
        ctx = torch.matmul(torch.softmax(scores, dim=-1), padded(sa.value(x), h, d))  # [K, h, 1, d]
        y = last.attention.output(ctx.reshape(cls.shape), cls)
        n = len(layers) - 1
        y = _packed_cross_attention(last.crossattention, y, kv[2 * n], kv[2 * n + 1])
        y = last.output(last.intermediate(y), y)
        return self.model.itm_head(y)


def itm_forms(model: ALBEF) -> dict[str, Any]:
    """The text->image graphs to export for this configuration, from the cost model: ``{"itm": form}``
    plus ``"itm_short": {"form": "bilinear", "max_length": n}`` when ``itm`` is ``kv`` but bilinear is cheaper
    for texts of at most ``n`` tokens. Base (577 image tokens, 12 heads of 64) is bilinear at every length up
    to 30; the tiny configurations (17-37 image tokens) switch at 12-19 tokens."""
    d = dims_of(model.config)
    n = bilinear_max_length(d)
    if n >= d.max_tokens:
        return {"itm": "bilinear"}
    if n == 0:
        return {"itm": "kv"}
    return {"itm": "kv", "itm_short": {"form": "bilinear", "max_length": n}}


def num_fusion_layers(model: ALBEF) -> int:
    cfg = model.config.text
    return cfg.num_hidden_layers - cfg.fusion_layer


def kv_names(model: ALBEF) -> list[str]:
    return [f"{kind}{i}" for i in range(num_fusion_layers(model)) for kind in ("k", "v")]


def example_inputs(
    model: ALBEF,
    batch: int = 2,
    length: int | None = None,
    seed: int = 0,
    encode_images: bool = True,
    lengths: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Deterministic inputs of every graph: random pixels, ids with ragged masks, and the model's own
    embeddings and token features for them (so ITM sees realistic activations). ``lengths``: the real
    length of each text (default: ``length``, then 3 fewer per row)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    length = length or cfg.max_tokens
    r = cfg.vision.image_res
    pixels = torch.randn(batch, 3, r, r, generator=g)
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, length), generator=g)
    ids[:, 0] = 101
    if lengths is None:
        lengths = [length] + [max(2, length - 3 * (i + 1)) for i in range(batch - 1)]
    if len(lengths) != batch or not all(1 <= n <= length for n in lengths):
        raise ValueError(f"lengths must be {batch} values in [1, {length}], got {list(lengths)}")
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
    itm = {
        "inputs": {"text_tokens": ["B|1", "L", h], "text_mask": ["B|1", "L"], "image_tokens": ["B|1", n, w]},
        "outputs": {"itm_logits": ["B", 2]},
    }
    return {
        "image_encoder": {
            "inputs": {"pixels": ["B", 3, r, r]},
            "outputs": {"image_emb": ["B", d], "image_tokens": ["B", n, w]},
        },
        "text_encoder": {
            "inputs": {"input_ids": ["B", "L"], "attention_mask": ["B", "L"]},
            "outputs": {"text_emb": ["B", d], "text_tokens": ["B", "L", h]},
        },
        "itm": itm,
        **({"itm_short": itm} if "itm_short" in itm_forms(model) else {}),
        "image_kv": {"inputs": {"image_tokens": ["1", n, w]}, "outputs": kv},
        "itm_kv": {
            "inputs": {"text_tokens": ["K", "L", h], "text_mask": ["K", "L"], **kv},
            "outputs": {"itm_logits": ["K", 2]},
        },
    }
