"""The fp32 ONNX graphs: one per adapter, traced with the legacy TorchScript exporter.

``dynamo=False``, opset 17 by default, dynamic batch and text-length axes; the fixed output sizes the tracer
leaves symbolic are written into each graph afterwards. The text->image graphs are ``itm`` and, for
configurations where the other cross-attention form is cheaper for short texts, ``itm_short``
(:func:`albef.model.export_adapters.itm_forms`); both are traced with one text against two images (the text
broadcasts) and accept a text batch equal to the image batch as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from albef.model.albef import ALBEF
from albef.model.export_adapters import (
    ImageEncoderAdapter,
    ImageKVAdapter,
    ItmAdapter,
    ItmKVAdapter,
    TextEncoderAdapter,
    example_inputs,
    io_description,
    itm_forms,
    kv_names,
)
from albef.model.export_defaults import DEFAULT_OPSET
from albef.model.runtime import variant_file

__all__ = ["DEFAULT_OPSET", "GraphSpec", "graph_specs", "export_graphs"]


Axes = dict[str, dict[int, str]]


class GraphSpec(NamedTuple):
    """What one graph is traced from: the adapter, its example arguments, I/O names and dynamic axes."""

    module: nn.Module
    args: tuple[Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    axes: Axes


def graph_specs(model: ALBEF, ex: dict[str, Tensor]) -> dict[str, GraphSpec]:
    """role -> spec, for the example inputs ``ex`` (:func:`example_inputs` with a batch of 2)."""
    kvn = kv_names(model)
    forms = itm_forms(model)
    t2i = {"itm": forms["itm"], **({"itm_short": forms["itm_short"]["form"]} if "itm_short" in forms else {})}
    batch = {0: "batch"}
    text = {0: "batch", 1: "length"}
    with torch.no_grad():
        kv = [t[:1].contiguous() for t in ImageKVAdapter(model)(ex["image_tokens"])]
    return {
        "image_encoder": GraphSpec(
            ImageEncoderAdapter(model),
            (ex["pixels"],),
            ["pixels"],
            ["image_emb", "image_tokens"],
            {"pixels": batch, "image_emb": batch, "image_tokens": batch},
        ),
        "text_encoder": GraphSpec(
            TextEncoderAdapter(model),
            (ex["input_ids"], ex["attention_mask"]),
            ["input_ids", "attention_mask"],
            ["text_emb", "text_tokens"],
            {"input_ids": text, "attention_mask": text, "text_emb": batch, "text_tokens": text},
        ),
        **{
            role: GraphSpec(
                ItmAdapter(model, form),
                # one text against two images: the broadcast is what the graph records
                (ex["text_tokens"][:1], ex["attention_mask"][:1], ex["image_tokens"]),
                ["text_tokens", "text_mask", "image_tokens"],
                ["itm_logits"],
                {
                    "text_tokens": {0: "text_batch", 1: "length"},
                    "text_mask": {0: "text_batch", 1: "length"},
                    "image_tokens": {0: "image_batch"},
                    "itm_logits": batch,
                },
            )
            for role, form in t2i.items()
        },
        "image_kv": GraphSpec(
            ImageKVAdapter(model),
            (ex["image_tokens"][:1],),
            ["image_tokens"],
            kvn,
            {"image_tokens": batch, **{n: batch for n in kvn}},
        ),
        # Traced with a K/V batch of 1 and two texts, so the broadcast is what the graph records.
        "itm_kv": GraphSpec(
            ItmKVAdapter(model),
            (ex["text_tokens"], ex["attention_mask"], *kv),
            ["text_tokens", "text_mask", *kvn],
            ["itm_logits"],
            {
                "text_tokens": text,
                "text_mask": text,
                "itm_logits": batch,
                **{n: {0: "kv_batch"} for n in kvn},
            },
        ),
    }


def export_graphs(
    model: ALBEF, out: Path, opset: int = DEFAULT_OPSET, roles: Sequence[str] | None = None
) -> dict[str, str]:
    """Write the fp32 graphs into ``out`` (all of them, or only ``roles``); returns role -> file name."""
    model = model.float().eval()
    specs = graph_specs(model, example_inputs(model, batch=2))
    io = io_description(model)
    files = {}
    with torch.no_grad():
        for role, spec in specs.items():
            if roles is not None and role not in roles:
                continue
            name = variant_file(role, "fp32")
            # Adapters must be in eval mode: the exporter restores the wrapper's mode afterwards, recursively,
            # and a fresh nn.Module is in training mode (that would switch the model's dropout on).
            _export(spec._replace(module=spec.module.eval()), out / name, opset)
            _set_static_output_dims(out / name, io[role]["outputs"])
            files[role] = name
    return files


def _export(spec: GraphSpec, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see module doc); timm's image-size assertion becomes a
        # trace constant, which is right because the resolution is fixed per bundle.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            spec.module,
            spec.args,
            str(path),
            input_names=spec.inputs,
            output_names=spec.outputs,
            dynamic_axes=spec.axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _set_static_output_dims(path: Path, shapes: dict[str, list[Any]]) -> None:
    """The tracer leaves some fixed output sizes symbolic (e.g. after normalize); write the known ones in."""
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for dim, want in zip(dims, shapes.get(out.name, []), strict=False):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
    onnx.save(model, str(path))
