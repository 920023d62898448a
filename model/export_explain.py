"""The explain graph: what Grad-CAM of the ITM match needs, as one ONNX graph the torch-free service runs.

ALBEF's own visualisation (docs/model.md §7) explains a match by Grad-CAM on the cross-attention of one fusion
layer: the attention probabilities of the text queries over the image tokens, times the positive part of
their gradient with respect to the ITM "match" logit. The service has no autograd, so the gradient is
computed here and exported with the forward:

- :class:`ExplainAdapter` runs the fusion layers up to the chosen layer's cross-attention softmax, then the
  rest of the ITM path (attention @ V, the cross-attention output, the FFN, the later fusion layers, the ITM
  head) as a function of those probabilities, and takes ``torch.autograd.grad`` of the match logit with
  respect to them. Its outputs are the ITM logits, the probabilities and their gradient.
- :func:`trace_explain` records that forward *and its backward* as one graph of plain ATen operations with
  ``make_fx`` (the tracer AOTAutograd uses), so the gradient becomes ordinary operators. The legacy
  TorchScript exporter cannot export ``autograd.grad`` and ``torch.export`` refuses it; the traced graph has
  no autograd left in it, and the dynamo-based ``torch.onnx.export`` turns it into ONNX (opset 18, the
  lowest that exporter implements). Shapes are static: one (text, image) pair per call, the text padded to
  the model's ``max_tokens`` as the tokenizer always pads. Tracing with dynamic axes took about four times
  as long per export for no use the service has.
- :func:`eager_reference` is the independent check: the unmodified eager model with a forward hook on the
  chosen cross-attention's probabilities and ``torch.autograd.grad`` to them. :func:`validate_explain` holds
  the ONNX graph to it within the export tolerance before anything is published.

The layer: the official code explains with encoder layer ``fusion_layer + 2``, the third of six fusion layers.
:func:`default_explain_layer` keeps that choice where a model has at least four fusion layers and otherwise
takes the second-to-last one (``min(2, n_fusion - 2)``, counted from 0 among the fusion layers; the only one
if there is one). Not the last: after the last cross-attention only token-wise layers and the head on [CLS]
follow, so the gradient of every other text token's row is exactly zero there and the per-word maps would
be blank. The tiny configs have two fusion layers and explain their first. ``albef export --explain-layer
N`` picks another.

The graph is float32 only; every variant of a bundle uses it (the int8 variant feeds it its own token
features).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from albef.model.albef import ALBEF
from albef.model.bert import extended_attention_mask
from albef.model.export_adapters import example_inputs, num_fusion_layers
from albef.model.export_defaults import FP32_TOLERANCE
from albef.model.runtime import EXPLAIN_FILE, EXPLAIN_INPUTS, EXPLAIN_OUTPUTS

__all__ = [
    "EXPLAIN_OPSET",
    "ExplainAdapter",
    "default_explain_layer",
    "explain_layer_for",
    "trace_explain",
    "export_explain",
    "eager_reference",
    "validate_explain",
    "explain_io",
]

EXPLAIN_OPSET = 18  # the dynamo-based exporter implements opset 18 and later


def default_explain_layer(n_fusion: int) -> int:
    """The official choice, the third fusion layer (index 2), but never the last one: at most ``n - 2`` (0 for
    a single fusion layer)."""
    if n_fusion < 1:
        raise ValueError("the model has no fusion layer to explain")
    return max(0, min(2, n_fusion - 2))


def explain_layer_for(model: ALBEF, layer: int | None) -> int:
    """The fusion layer to explain: ``layer`` if given and valid (a ValueError otherwise), else the default."""
    n = num_fusion_layers(model)
    chosen = default_explain_layer(n) if layer is None else int(layer)
    if not 0 <= chosen < n:
        raise ValueError(f"explain layer {chosen} is outside the {n} fusion layers (0..{n - 1})")
    return chosen


class ExplainAdapter(nn.Module):
    """(text tokens, mask, image tokens) -> (ITM logits ``[B,2]``, the cross-attention probabilities of fusion
    layer ``layer`` ``[B,heads,L,N]``, and the gradient of the summed match logits with respect to them).

    The rows of a batch are independent, so row ``b`` of the gradient is that of its own match logit."""

    def __init__(self, model: ALBEF, layer: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer = explain_layer_for(model, layer)

    def forward(
        self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        layers = self.model.text_encoder.fusion_layers
        target = layers[self.layer]
        cross = target.crossattention.self
        ext = extended_attention_mask(text_mask, text_tokens.dtype)
        with torch.no_grad():  # below the attention map: the forward only
            hidden = text_tokens
            for layer in layers[: self.layer]:
                hidden = layer(hidden, ext, image_tokens)
            x = target.attention(hidden, ext)  # the self-attention sub-block
            q = cross.split_heads(cross.query(x))
            k, v = cross.key_value(image_tokens)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(cross.head_dim)
            probs = torch.softmax(scores, dim=-1)  # no dropout in eval mode
        with torch.enable_grad():  # above it: a function of the probabilities, differentiated
            tap = probs.clone().requires_grad_(True)
            ctx = torch.matmul(tap, v).permute(0, 2, 1, 3)
            y = target.crossattention.output(ctx.reshape(ctx.shape[0], ctx.shape[1], -1), x)
            hidden = target.output(target.intermediate(y), y)
            for layer in layers[self.layer + 1 :]:
                hidden = layer(hidden, ext, image_tokens)
            logits = self.model.itm_head(hidden[:, 0, :])
            (grad,) = torch.autograd.grad(logits[:, 1].sum(), tap)
        return logits.detach(), probs, grad


def _example(model: ALBEF, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """One pair at the graph's static shapes: a ragged text padded to ``max_tokens``, random image tokens."""
    ex = example_inputs(model, batch=2, seed=seed)
    return ex["text_tokens"][1:], ex["attention_mask"][1:], ex["image_tokens"][1:]


def trace_explain(model: ALBEF, layer: int | None = None) -> torch.fx.GraphModule:
    """The adapter's forward and backward as one graph of ATen operations (no autograd left in it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = model.float().eval()
    adapter = ExplainAdapter(model, layer).eval()
    # Fake inputs, real weights: the weights become constants of the graph.
    return make_fx(adapter, tracing_mode="fake", _allow_non_fake_inputs=True)(*_example(model))


def export_explain(model: ALBEF, out: Path, layer: int | None = None) -> dict[str, Any]:
    """Write ``explain.onnx`` into ``out``; returns the manifest's ``explain`` section (without validation)."""
    model = model.float().eval()
    chosen = explain_layer_for(model, layer)
    graph = trace_explain(model, chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            graph,
            _example(model),
            None,
            input_names=list(EXPLAIN_INPUTS),
            output_names=list(EXPLAIN_OUTPUTS),
            opset_version=EXPLAIN_OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(out / EXPLAIN_FILE), external_data=False)
    cfg = model.config
    return {
        "file": EXPLAIN_FILE,
        "fusion_layer": chosen,
        "encoder_layer": cfg.text.fusion_layer + chosen,
        "num_fusion_layers": num_fusion_layers(model),
        "rule": "the official third fusion layer, or the second-to-last of fewer (min(2, n - 2), from 0)",
        "grid_side": cfg.vision.image_res // cfg.vision.patch_size,
        "length": cfg.max_tokens,
        "opset": EXPLAIN_OPSET,
        "weights": "float32",
        "gradient": "d itm_logits[:, 1] / d attention (make_fx trace of torch.autograd.grad)",
    }


def explain_io(model: ALBEF) -> dict[str, Any]:
    """The explain graph's input/output shapes, as :func:`io_description` records the other graphs."""
    cfg = model.config
    n = cfg.vision.num_patches + 1
    length, h, heads = cfg.max_tokens, cfg.text.hidden_size, cfg.text.num_attention_heads
    attn = [1, heads, length, n]
    return {
        "inputs": {
            "text_tokens": [1, length, h],
            "text_mask": [1, length],
            "image_tokens": [1, n, cfg.vision.width],
        },
        "outputs": {"itm_logits": [1, 2], "attention": attn, "attention_grad": attn},
    }


def eager_reference(
    model: ALBEF, layer: int, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor
) -> dict[str, np.ndarray]:
    """What the official visualisation computes, on the unmodified eager model: a forward hook keeps the
    probabilities the chosen cross-attention multiplies with V, and autograd gives the match logit's gradient
    with respect to them. Returns ``itm_logits``, ``attention`` and ``attention_grad`` as numpy."""
    model.eval()
    module = model.text_encoder.fusion_layers[layer].crossattention.self.dropout
    kept: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inputs, output: kept.append(output))
    try:
        with torch.enable_grad():
            logits = model.itm_logits(text_tokens, text_mask, image_tokens)
            (grad,) = torch.autograd.grad(logits[:, 1].sum(), kept[0])
    finally:
        handle.remove()
    return {
        "itm_logits": logits.detach().numpy(),
        "attention": kept[0].detach().numpy(),
        "attention_grad": grad.numpy(),
    }


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def validate_explain(
    model: ALBEF, bundle_dir: Path, layer: int, tolerance: float = FP32_TOLERANCE, seed: int = 1
) -> dict[str, Any]:
    """ONNX Runtime's explain graph (through :class:`Bundle`) against :func:`eager_reference` on three pairs
    with ragged texts: the max abs differences. Raises ``ExportError`` beyond ``tolerance``."""
    from albef.model.export_validate import ExportError
    from albef.model.runtime import Bundle

    bundle = Bundle.load(bundle_dir)
    ex = example_inputs(model, batch=3, seed=seed)
    diffs: dict[str, list[float]] = {name: [] for name in EXPLAIN_OUTPUTS}
    for row in range(3):
        args = (
            ex["text_tokens"][row : row + 1],
            ex["attention_mask"][row : row + 1],
            ex["image_tokens"][row : row + 1],
        )
        ref = eager_reference(model, layer, *args)
        got = bundle.explain(*(a.numpy() for a in args))
        for name in EXPLAIN_OUTPUTS:
            diffs[name].append(_maxdiff(ref[name], got[name]))
    figures: dict[str, Any] = {name: float(f"{max(v):.3g}") for name, v in diffs.items()}
    figures["tolerance"] = tolerance
    bad = {k: v for k, v in figures.items() if k != "tolerance" and v > tolerance}
    if bad:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ExportError(
            f"the explain graph differs from torch autograd by more than {tolerance:g}: {detail}"
        )
    return figures
