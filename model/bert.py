"""The BERT text/fusion encoder of ALBEF (``models/xbert.py`` in the official code), as our own modules.

Parameter names equal the official ones (docs/model.md §3.2) so checkpoints load strictly. Layers below
``fusion_layer`` are text-only; layers from ``fusion_layer`` on add cross-attention to the image tokens.
Post-LN sub-blocks, exact-erf GELU, LayerNorm eps 1e-12, self-attention mask ``(1 - mask) * -10000``.
Cross-attention has no mask: image tokens are all valid, and the official all-ones mask adds zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from albef.model.config import TextConfig

# Per fusion layer, the cross-attention keys and values of one set of image tokens: [B|1, heads, N, d].
ImageKV = list[tuple[Tensor, Tensor]]

MODES = ("text", "fusion", "multi_modal")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # Non-persistent: official files may carry it; the loader drops it.
        self.register_buffer(
            "position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        position_ids = self.position_ids[:, :length]
        # Token types are always 0 (no [SEP], single sentence); row 0 is still added, in xbert's order.
        token_type_ids = torch.zeros_like(input_ids)
        emb = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        emb = emb + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(emb))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, is_cross_attention: bool) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_width = cfg.encoder_width if is_cross_attention else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def key_value(self, states: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        q = self.split_heads(self.query(hidden_states))
        if kv is None:
            kv = self.key_value(hidden_states if encoder_hidden_states is None else encoder_hidden_states)
        k, v = kv
        # A K/V batch of 1 broadcasts over the candidates (image->text re-ranking).
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3)
        return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)


class BertSelfOutput(nn.Module):
    """The post-LN close of every BERT sub-block: ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, cfg: TextConfig, in_features: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, is_cross_attention)
        self.output = BertSelfOutput(cfg)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        return self.output(self.self(hidden_states, attention_mask, encoder_hidden_states, kv), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as config_bert.json's "gelu"


class BertOutput(BertSelfOutput):
    """The FFN's close: the same arithmetic from the intermediate width."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_num: int) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.has_cross_attention = layer_num >= cfg.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(cfg, is_cross_attention=True)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor | None = None,
        image_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = self.attention(hidden_states, attention_mask)
        if self.has_cross_attention:
            if image_tokens is None and image_kv is None:
                raise ValueError("a fusion layer needs image tokens or their cached keys/values")
            x = self.crossattention(x, None, image_tokens, image_kv)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i) for i in range(cfg.num_hidden_layers)])


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # tied, as in HF: both keys appear in the state dict

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


def extended_attention_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """xbert's ``get_extended_attention_mask`` for a bidirectional encoder."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


class BertModel(nn.Module):
    """Text encoder (layers < fusion_layer) and fusion encoder (the rest) in one module.

    With ``with_mlm`` it also carries the MLM head as ``cls`` (official ``text_encoder.cls.*``) with the
    decoder tied to the word embeddings.
    """

    def __init__(self, cfg: TextConfig, with_mlm: bool = False) -> None:
        super().__init__()
        if not 0 <= cfg.fusion_layer <= cfg.num_hidden_layers:
            raise ValueError("fusion_layer must lie in [0, num_hidden_layers]")
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        if with_mlm:
            self.cls = BertOnlyMLMHead(cfg)
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    @property
    def fusion_layers(self) -> list[BertLayer]:
        return list(self.encoder.layer[self.config.fusion_layer :])  # type: ignore[arg-type]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_embeds: Tensor | None = None,
        image_tokens: Tensor | None = None,
        image_kv: ImageKV | None = None,
        mode: str = "multi_modal",
    ) -> Tensor:
        """Last hidden states. ``mode``: 'text' (layers below fusion_layer, from ids), 'fusion' (layers from
        fusion_layer, from ``encoder_embeds`` = the text-mode output) or 'multi_modal' (all, from ids)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "fusion":
            if encoder_embeds is None:
                raise ValueError("mode 'fusion' needs encoder_embeds (the text-mode output)")
            hidden = encoder_embeds
        else:
            if input_ids is None:
                raise ValueError(f"mode {mode!r} needs input_ids")
            hidden = self.embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        ext = extended_attention_mask(attention_mask, hidden.dtype)
        fusion = self.config.fusion_layer
        start, stop = {
            "text": (0, fusion),
            "fusion": (fusion, len(self.encoder.layer)),
            "multi_modal": (0, len(self.encoder.layer)),
        }[mode]
        for i in range(start, stop):
            layer = self.encoder.layer[i]
            kv = image_kv[i - fusion] if (image_kv is not None and i >= fusion) else None
            hidden = layer(hidden, ext, image_tokens, kv)
        return hidden

    def image_kv(self, image_tokens: Tensor) -> ImageKV:
        """Cross-attention keys/values of every fusion layer, computed once for a set of image tokens."""
        return [layer.crossattention.self.key_value(image_tokens) for layer in self.fusion_layers]
