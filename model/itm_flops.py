"""What the ITM re-ranking graphs compute, counted: multiply-adds of every matrix product, per form.

Torch-free (the runtime, the export and ``bench/bench_rerank.py`` share it). The count covers matrix products
only (projections, attention products, FFN, ITM head); softmax, LayerNorm, GELU and the adds are a few
percent of the work and are left out. One multiply-add is two FLOPs. Each product is tagged ``weight`` (one
operand is a constant: the int8 variant quantises it) or ``activation`` (both operands are data: attention
scores, probabilities times values; float32 in every variant).

The forms of a fusion layer's cross-attention (text queries ``Lq``, image tokens ``N`` of width ``W``, hidden
width ``H`` in ``heads`` heads of ``d``):

- ``kv``: the official form. Keys and values of the image are projected, ``2 N W H``, then
  ``scores = Q K^T`` and ``P V``, ``2 Lq N H``. Image->text computes K/V once per query image
  (:func:`image_kv_macs`), text->image once per pair.
- ``bilinear``: attention is bilinear, so keys and values need never be formed. Per head,
  ``scores_h = (Q_h W_k,h) X^T`` (the key bias adds a constant per query row, which softmax ignores) and
  ``out_h = (P_h X) W_v,h^T + b_v`` (the rows of ``P_h`` sum to one). Cost ``2 Lq H W`` (the two per-head
  weight products) plus ``2 heads Lq N W``: it grows with text tokens x heads instead of image tokens, and is
  cheaper than ``kv`` for every ``Lq < d`` (:func:`bilinear_max_length`). Exact up to float rounding.

Savings common to both graphs: the text runs at its real length (the runtime trims the padding; image->text
packs its candidate texts so no padded row is computed), and the last fusion layer runs its query side for
the [CLS] row only (the only row the ITM head reads; every row still serves as a key/value of its
self-attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Dims",
    "Macs",
    "dims_of",
    "cross_attention_macs",
    "layer_macs",
    "image_kv_macs",
    "t2i_query_macs",
    "i2t_query_macs",
    "official_pair_macs",
    "bilinear_max_length",
]

Form = Literal["kv", "bilinear"]


@dataclass(frozen=True)
class Dims:
    """The sizes the ITM cost depends on."""

    hidden: int  # H, the text width
    heads: int
    intermediate: int  # FFN width
    image_tokens: int  # N
    image_width: int  # W, the image token width (cross-attention key/value input)
    fusion_layers: int
    max_tokens: int  # the padded text length of the official evaluation


def dims_of(config: Any) -> Dims:
    """The :class:`Dims` of an :class:`~albef.model.config.AlbefConfig` (or its manifest dict)."""
    cfg = config if not isinstance(config, dict) else _AttrDict(config)
    text, vision = cfg.text, cfg.vision
    return Dims(
        hidden=int(text.hidden_size),
        heads=int(text.num_attention_heads),
        intermediate=int(text.intermediate_size),
        image_tokens=(int(vision.image_res) // int(vision.patch_size)) ** 2 + 1,
        image_width=int(text.encoder_width),
        fusion_layers=int(text.num_hidden_layers) - int(text.fusion_layer),
        max_tokens=int(cfg.max_tokens),
    )


class _AttrDict:
    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    def __getattr__(self, name: str) -> Any:
        v = self._d[name]
        return _AttrDict(v) if isinstance(v, dict) else v


@dataclass
class Macs:
    """Multiply-adds by kind: ``weight`` (a constant operand; int8 in the int8 variant) and ``activation``."""

    weight: float = 0.0
    activation: float = 0.0

    @property
    def total(self) -> float:
        return self.weight + self.activation

    @property
    def flops(self) -> float:
        return 2.0 * self.total

    def __add__(self, other: Macs) -> Macs:
        return Macs(self.weight + other.weight, self.activation + other.activation)

    def scaled(self, factor: float) -> Macs:
        return Macs(self.weight * factor, self.activation * factor)


def cross_attention_macs(d: Dims, form: Form, lq: float, *, with_kv: bool = True) -> Macs:
    """One cross-attention sub-block for one pair, ``lq`` query rows (Q and output projections included).
    ``with_kv=False``: the ``kv`` form with the image's keys/values given (image->text)."""
    h, w, n = d.hidden, d.image_width, d.image_tokens
    proj = 2.0 * lq * h * h  # Q and the output dense
    if form == "kv":
        kv = 2.0 * n * w * h if with_kv else 0.0
        return Macs(proj + kv, 2.0 * lq * n * h)
    if form == "bilinear":
        return Macs(proj + 2.0 * lq * h * w, 2.0 * d.heads * lq * n * w)
    raise ValueError(f"unknown cross-attention form {form!r}")


def _self_attention_macs(
    d: Dims, lq: float, lk: float, padded: float | None = None, cls_only: bool = False
) -> Macs:
    """Q for ``lq`` rows, K/V for ``lk``; the score and value products over ``padded`` keys (and queries,
    unless only [CLS] is a query) when the attention runs in a padded layout."""
    h = d.hidden
    pk = lk if padded is None else padded
    pq = lq if (padded is None or cls_only) else padded
    return Macs(2.0 * lq * h * h + 2.0 * lk * h * h, 2.0 * pq * pk * h)


def _ffn_macs(d: Dims, lq: float) -> Macs:
    return Macs(2.0 * lq * d.hidden * d.intermediate)


def layer_macs(
    d: Dims, form: Form, length: float, *, last: bool, with_kv: bool = True, padded: float | None = None
) -> Macs:
    """One fusion layer for one pair of a text of ``length`` tokens. ``last``: only [CLS] is a query.
    ``padded``: the self-attention products run over that many positions (packed image->text texts)."""
    lq = 1.0 if last else float(length)
    return (
        _self_attention_macs(d, lq, float(length), padded, cls_only=last)
        + cross_attention_macs(d, form, lq, with_kv=with_kv)
        + _ffn_macs(d, lq)
    )


def _stack_macs(d: Dims, form: Form, length: float, with_kv: bool, padded: float | None = None) -> Macs:
    total = Macs()
    for i in range(d.fusion_layers):
        last = i == d.fusion_layers - 1
        # the [CLS]-only last layer is cheapest bilinear whenever the image K/V are not given
        f: Form = "bilinear" if (last and with_kv) else form
        total = total + layer_macs(d, f, length, last=last, with_kv=with_kv, padded=padded)
    return total + Macs(2.0 * d.hidden)  # the ITM head


def image_kv_macs(d: Dims) -> Macs:
    """Keys and values of one image in every fusion layer (image->text computes them once per query)."""
    return Macs(d.fusion_layers * 2.0 * d.image_tokens * d.image_width * d.hidden)


def t2i_query_macs(d: Dims, form: Form, length: int, k: int) -> Macs:
    """One text query against ``k`` images, as our ``itm`` graph computes it: the text at its real length,
    passed once (the first fusion layer's self-attention and its cross-attention queries are shared by the
    ``k`` pairs), ``form`` in every layer but the last, whose [CLS]-only cross-attention is bilinear."""
    per_pair = _stack_macs(d, form, length, with_kv=True)
    h, w = d.hidden, d.image_width
    # layer 0 before the image comes in: its self-attention and cross-attention queries (and, bilinear, the
    # queries' Q_h W_k,h); with a single fusion layer that layer is the [CLS]-only bilinear one
    lq = 1.0 if d.fusion_layers == 1 else float(length)
    shared = _self_attention_macs(d, lq, length) + Macs(lq * h * h)
    if form == "bilinear" or d.fusion_layers == 1:
        shared = shared + Macs(lq * h * w)
    return per_pair.scaled(k) + shared.scaled(-(k - 1))


def i2t_query_macs(d: Dims, lengths: Sequence[int], *, include_image_kv: bool = True) -> Macs:
    """One image query against texts of the given real lengths, as our ``image_kv`` + ``itm_kv`` graphs
    compute it: K/V once, every text packed at its own length (self-attention scores in the layout padded to
    the longest), the [CLS]-only last layer."""
    total = image_kv_macs(d) if include_image_kv else Macs()
    longest = float(max(lengths, default=0))
    for n in lengths:
        # every product is over the text's own tokens but self-attention's, which runs padded to the longest
        total = total + _stack_macs(d, "kv", n, with_kv=False, padded=longest)
    return total


def official_pair_macs(d: Dims, length: int | None = None) -> Macs:
    """One pair as the official evaluation computes it: the query repeated ``k`` times, texts padded to
    ``max_tokens``, K/V projected for every pair, every row a query in every layer."""
    n = d.max_tokens if length is None else length
    total = Macs()
    for _ in range(d.fusion_layers):
        total = total + layer_macs(d, "kv", n, last=False)
    return total + Macs(2.0 * d.hidden)


def bilinear_max_length(d: Dims) -> int:
    """The longest text (at most ``max_tokens``) for which a full fusion layer is cheaper bilinear than with
    K/V (0: never). The two costs differ only in the cross-attention, linearly in the length."""
    best = 0
    for n in range(1, d.max_tokens + 1):
        if cross_attention_macs(d, "bilinear", n).total < cross_attention_macs(d, "kv", n).total:
            best = n
    return best
