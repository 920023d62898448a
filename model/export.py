"""Export an ALBEF model to a model bundle: five ONNX graphs, tokenizer, preprocessing and a manifest.

Each graph is a small ``nn.Module`` adapter around one inference path of :class:`ALBEF`, exported with
the legacy TorchScript exporter (``dynamo=False``, opset 17) with dynamic batch and text-length axes.
Before anything is published, PyTorch and ONNX Runtime run the same inputs; the fp32 export fails if
embeddings or ITM logits differ by more than ``FP32_TOLERANCE``. The bundle is built in
``OUT_DIR.tmp-XXXX`` and renamed into place, so a failed export leaves nothing behind.

Faster variants: ``int8`` (:mod:`albef.model.quantize`: MatMul/Gemm weights int8 in a 7-bit range,
activations quantised on the fly), validated on the machine that exports it against
:data:`~albef.model.quantize.INT8_BOUNDS`; a variant that misses them is not shipped (the manifest says
why). ``bf16`` is shipped only if ONNX Runtime on this CPU runs bf16 MatMul faster than fp32; otherwise the
probe's result is recorded in the manifest instead.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from albef.model.albef import ALBEF
from albef.model.quantize import (
    INT8_BOUNDS,
    bounds_dict,
    check_int8,
    int8_scheme,
    max_int8_weight,
    quantize_int8,
)
from albef.model.ranking import rank
from albef.model.runtime import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    VARIANTS,
    VOCAB_FILE,
    bundle_id_from_files,
    sha256_file,
    variant_file,
)
from albef.model.text import AlbefTokenizer, default_vocab_path
from torch import Tensor, nn

from albef import atomic
from albef.cpu import cpu_info

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FP32_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export could not be validated or written; nothing was published."""


# -- adapters: one inference path each, plain tensors in and out ------------------------------------------
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


# -- example inputs --------------------------------------------------------------------------------------
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


# -- export ----------------------------------------------------------------------------------------------
def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    import warnings

    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see module doc); timm's image-size assertion becomes a
        # trace constant, which is right because the resolution is fixed per bundle.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _export_quiet(module, args, path, inputs, outputs, dynamic_axes, opset)


def _export_quiet(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
                  dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def export_graphs(model: ALBEF, out: Path, opset: int = DEFAULT_OPSET) -> dict[str, str]:
    """Write the five fp32 graphs into ``out``; returns role -> file name."""
    model = model.float().eval()
    ex = example_inputs(model, batch=2)
    kvn = kv_names(model)
    batch = {0: "batch"}
    text = {0: "batch", 1: "length"}
    with torch.no_grad():
        kv = [t[:1].contiguous() for t in ImageKVAdapter(model)(ex["image_tokens"])]
        specs: dict[str, tuple[nn.Module, tuple[Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]] = {
            "image_encoder": (
                ImageEncoderAdapter(model),
                (ex["pixels"],),
                ["pixels"],
                ["image_emb", "image_tokens"],
                {"pixels": batch, "image_emb": batch, "image_tokens": batch},
            ),
            "text_encoder": (
                TextEncoderAdapter(model),
                (ex["input_ids"], ex["attention_mask"]),
                ["input_ids", "attention_mask"],
                ["text_emb", "text_tokens"],
                {"input_ids": text, "attention_mask": text, "text_emb": batch, "text_tokens": text},
            ),
            "itm": (
                ItmAdapter(model),
                (ex["text_tokens"], ex["attention_mask"], ex["image_tokens"]),
                ["text_tokens", "text_mask", "image_tokens"],
                ["itm_logits"],
                {"text_tokens": text, "text_mask": text, "image_tokens": {0: "image_batch"}, "itm_logits": batch},
            ),
            "image_kv": (
                ImageKVAdapter(model),
                (ex["image_tokens"][:1],),
                ["image_tokens"],
                kvn,
                {"image_tokens": batch, **{n: batch for n in kvn}},
            ),
            # Traced with a K/V batch of 1 and two texts, so the broadcast is what the graph records.
            "itm_kv": (
                ItmKVAdapter(model),
                (ex["text_tokens"], ex["attention_mask"], *kv),
                ["text_tokens", "text_mask", *kvn],
                ["itm_logits"],
                {"text_tokens": text, "text_mask": text, "itm_logits": batch, **{n: {0: "kv_batch"} for n in kvn}},
            ),
        }
        files = {}
        io = io_description(model)
        for role, (module, args, inputs, outputs, axes) in specs.items():
            name = variant_file(role, "fp32")
            # Adapters must be in eval mode: the exporter restores the wrapper's mode afterwards, recursively,
            # and a fresh nn.Module is in training mode (that would switch the model's dropout on).
            _export(module.eval(), args, out / name, inputs, outputs, axes, opset)
            _set_static_output_dims(out / name, io[role]["outputs"])
            files[role] = name
    return files


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


def probe_bf16(threads: int = 2, m: int = 256, k: int = 768, n: int = 3072, reps: int = 20) -> dict[str, Any]:
    """Can ONNX Runtime's CPU provider run a bf16 MatMul, and is it faster than fp32? Measured, not assumed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def build(bf16: bool) -> bytes:
        w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
        dt = TensorProto.BFLOAT16 if bf16 else TensorProto.FLOAT
        init = numpy_helper.from_array(w, "W")
        nodes = [helper.make_node("MatMul", ["X", "Wc"], ["Y"])]
        nodes.insert(0, helper.make_node("Cast", ["W"], ["Wc"], to=dt))
        graph = helper.make_graph(
            nodes, "probe", [helper.make_tensor_value_info("X", dt, [m, k])],
            [helper.make_tensor_value_info("Y", dt, [m, n])], [init],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def timed(model: bytes, x: Any) -> float:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        sess.run(None, {"X": x})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sess.run(None, {"X": x})
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    x32 = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    flop = 2.0 * m * k * n
    t32 = timed(build(False), x32)
    result: dict[str, Any] = {
        "op": f"MatMul [{m},{k}]x[{k},{n}]",
        "threads": threads,
        "fp32_gflops": round(flop / t32 / 1e9, 1),
        "onnxruntime": _version("onnxruntime"),
    }
    try:
        import ml_dtypes  # numpy's bf16 type; a dependency of onnx

        tb = timed(build(True), x32.astype(ml_dtypes.bfloat16))
    except Exception as exc:  # ORT raises NOT_IMPLEMENTED when it has no bf16 kernel
        result.update(supported=False, faster=False, error=str(exc).splitlines()[0][:300])
        return result
    result.update(supported=True, bf16_gflops=round(flop / tb / 1e9, 1), faster=bool(tb < t32))
    return result


# -- validation ------------------------------------------------------------------------------------------
def _maxdiff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(cos.min())


def torch_reference(model: ALBEF, seed: int = 1) -> dict[str, Any]:
    """PyTorch outputs on the validation inputs, computed once and shared by every variant's validation.

    Inputs: 3 images, 3 texts of ragged lengths at full length and at a shorter padded length (the
    dynamic axis), plain ITM pairs and one image against all texts (what the K/V-cached graph computes)."""
    model.eval()
    ex = example_inputs(model, batch=3, seed=seed)
    short = example_inputs(model, batch=3, length=max(4, model.config.max_tokens // 2), seed=seed + 1,
                           encode_images=False)
    ref: dict[str, Any] = {"pixels": ex["pixels"].numpy(), "image_emb": ex["image_emb"].numpy(),
                           "image_tokens": ex["image_tokens"].numpy(), "texts": []}
    img = ex["image_tokens"]
    with torch.no_grad():
        for inp in (ex, short):
            tok, mask = inp["text_tokens"], inp["attention_mask"]
            ref["texts"].append({
                "ids": inp["input_ids"].numpy(),
                "mask": mask.numpy(),
                "text_emb": inp["text_emb"].numpy(),
                "text_tokens": tok.numpy(),
                "itm": model.itm_logits(tok, mask, img).numpy(),
                "itm_one_image": model.itm_logits(tok, mask, img[:1].expand(tok.shape[0], -1, -1)).numpy(),
            })
    return ref


def validate(ref: dict[str, Any], bundle_dir: Path, variant: str) -> dict[str, float]:
    """ONNX Runtime (through :class:`Bundle`) on the reference inputs: max abs differences to PyTorch,
    and the K/V-cached ITM graph against the plain one."""
    from albef.model.runtime import Bundle

    bundle = Bundle.load(bundle_dir, variant=variant)
    figures: dict[str, float] = {}
    o_img_emb, o_img_tok = bundle.encode_pixels(ref["pixels"])
    figures["image_emb"] = _maxdiff(ref["image_emb"], o_img_emb)
    figures["image_tokens"] = _maxdiff(ref["image_tokens"], o_img_tok)
    figures["image_emb_min_cos"] = _min_cos(ref["image_emb"], o_img_emb)
    text_diffs, tok_diffs, coss, itm_diffs, kv_diffs = [], [], [], [], []
    img1 = ref["image_tokens"][:1]
    for t in ref["texts"]:
        o_emb, o_tok = bundle.encode_ids(t["ids"], t["mask"])
        text_diffs.append(_maxdiff(t["text_emb"], o_emb))
        tok_diffs.append(_maxdiff(t["text_tokens"], o_tok))
        coss.append(_min_cos(t["text_emb"], o_emb))
        # ITM on PyTorch's token features, so the figure is the ITM graph's own error
        itm_diffs.append(_maxdiff(t["itm"], bundle.itm_scores(t["text_tokens"], t["mask"], ref["image_tokens"])))
        o_kv = bundle.itm_scores_for_image(img1, t["text_tokens"], t["mask"])
        itm_diffs.append(_maxdiff(t["itm_one_image"], o_kv))
        repeated = np.repeat(img1, len(t["mask"]), axis=0)
        kv_diffs.append(_maxdiff(o_kv, bundle.itm_scores(t["text_tokens"], t["mask"], repeated)))
    figures["text_emb"] = max(text_diffs)
    figures["text_tokens"] = max(tok_diffs)
    figures["text_emb_min_cos"] = min(coss)
    figures["itm_logits"] = max(itm_diffs)
    figures["itm_kv_vs_itm"] = max(kv_diffs)
    # differences to 3 significant digits; cosines to 6 decimals (rounding 0.9946 to 0.995 would hide a miss)
    return {k: round(v, 6) if k.endswith("_cos") else float(f"{v:.3g}") for k, v in figures.items()}


def check_fp32(figures: dict[str, float], tolerance: float = FP32_TOLERANCE) -> None:
    bad = {k: figures[k] for k in ("image_emb", "text_emb", "itm_logits", "itm_kv_vs_itm") if figures[k] > tolerance}
    if bad:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ExportError(f"ONNX Runtime differs from PyTorch by more than {tolerance:g}: {detail}")


# -- manifest --------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def library_versions() -> dict[str, str | None]:
    names = ("torch", "onnx", "onnxruntime", "timm", "tokenizers", "numpy", "pillow", "albef-search")
    out = {n: _version(n) for n in names}
    out["python"] = platform.python_version()
    return out


def _write_json(path: Path, data: Any) -> None:
    atomic.write_json(path, data)


def write_manifest(out: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Hash every file except the manifest; the bundle id is the sha256 over those hashes."""
    files = {}
    for f in sorted(out.iterdir()):
        if f.name == MANIFEST_FILE or not f.is_file():
            continue
        files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {**base, "files": files, "bundle_id": bundle_id_from_files(files)}
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def source_info(checkpoint: str | Path | None) -> dict[str, Any]:
    """The checkpoint's path and sha256 (of the weights file for our folder format)."""
    if checkpoint is None:
        return {"path": None, "sha256": None, "note": "in-memory model"}
    p = Path(checkpoint)
    weights = p / "model.safetensors" if p.is_dir() else p
    info: dict[str, Any] = {"path": str(p), "sha256": sha256_file(weights), "file": weights.name}
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is not None and cfg.is_file():
        info["config_sha256"] = sha256_file(cfg)
        try:
            info["provenance"] = json.loads(cfg.read_text()).get("source", {})
        except json.JSONDecodeError:
            pass
    return info


# -- the whole export ------------------------------------------------------------------------------------
def _checkpoint_vocab(checkpoint: str | Path | None) -> Path | None:
    """A checkpoint folder may carry its own ``vocab.txt`` (the shipped tiny model does), so a fresh install
    exports it without the optional vocab package."""
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    candidate = (p if p.is_dir() else p.parent) / VOCAB_FILE
    return candidate if candidate.is_file() else None


Evaluator = Callable[[Path, str], dict[str, Any]]


def export_bundle(
    model: ALBEF,
    out_dir: str | Path,
    *,
    variants: Sequence[str] = ("fp32", "int8"),
    opset: int = DEFAULT_OPSET,
    vocab: str | Path | None = None,
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    evaluator: Evaluator | None = None,
    tolerance: float = FP32_TOLERANCE,
    int8_per_channel: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Export ``model`` into a bundle at ``out_dir`` and return its manifest.

    ``evaluator(bundle_tmp_dir, variant) -> figures`` (optional) measures each variant's retrieval quality
    (e.g. R@1 on the synthetic benchmark); its result is stored under ``variants[v]["eval"]``.
    """
    from albef.progress import progress_bar

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in variants:
        variants = ["fp32", *variants]  # fp32 is the reference every other variant is validated against
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (use overwrite/--force to replace it)")
    vocab_path = Path(vocab) if vocab is not None else _checkpoint_vocab(checkpoint) or default_vocab_path()
    if not vocab_path.is_file():
        raise ExportError(f"vocab file not found: {vocab_path}")
    config = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    steps = ["export fp32", "validate fp32", *[f"{v}" for v in variants if v != "fp32"], "manifest"]
    bar = progress_bar(total=len(steps) + (len(variants) if evaluator else 0), desc="export", enabled=progress)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        tok = AlbefTokenizer.from_vocab(vocab_path, max_tokens=config.max_tokens)
        tok.save(tmp / TOKENIZER_FILE)
        shutil.copyfile(vocab_path, tmp / VOCAB_FILE)
        _write_json(tmp / PREPROCESS_FILE, {
            "image_res": config.vision.image_res,
            "mean": list(config.mean),
            "std": list(config.std),
            "interpolation": "bicubic",
            "resize": "square",
            "scale": 1 / 255,
            "channels": "RGB",
            "layout": "NCHW",
        })
        bar.set_postfix_str("exporting graphs")
        files32 = export_graphs(model, tmp, opset)
        timings["export_s"] = round(time.perf_counter() - t0, 2)
        bar.update()
        base: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": config.to_dict(),
            "source": source_info(checkpoint),
            "opset": opset,
            "libraries": library_versions(),
            "io": io_description(model),
            "variants": {"fp32": {"files": files32, "weights": "float32"}},
            "variants_not_shipped": {},
        }
        write_manifest(tmp, base)  # provisional: validation loads the bundle through the runtime
        t0 = time.perf_counter()
        ref = torch_reference(model)
        figures = validate(ref, tmp, "fp32")
        base["variants"]["fp32"]["validation"] = figures
        timings["validate_fp32_s"] = round(time.perf_counter() - t0, 2)
        check_fp32(figures, tolerance)
        bar.update()
        for v in variants:
            if v == "fp32":
                continue
            bar.set_postfix_str(v)
            t0 = time.perf_counter()
            if v == "int8":
                files = quantize_int8(tmp, files32, int8_per_channel)
                base["variants"]["int8"] = {
                    "files": files,
                    "weights": int8_scheme(int8_per_channel),
                    "per_channel": int8_per_channel,
                    "reduce_range": True,
                }
                write_manifest(tmp, base)
                figures = validate(ref, tmp, "int8")
                figures["max_int8_weight"] = max(max_int8_weight(tmp / f) for f in files.values())
                base["variants"]["int8"]["validation"] = {
                    **figures, "cpu": cpu_info(), "bounds": bounds_dict(), "failed": check_int8(figures),
                }
            elif v == "bf16":
                probe = probe_bf16()
                if not (probe.get("supported") and probe.get("faster")):
                    base["variants_not_shipped"]["bf16"] = {
                        "reason": "ONNX Runtime's CPU provider has no faster bf16 MatMul on this machine",
                        "probe": probe,
                        "alternative": "int8 (shipped) or torch bf16 outside the ONNX runtime",
                    }
                else:  # pragma: no cover - no such kernel in the ORT builds we have seen
                    base["variants_not_shipped"]["bf16"] = {
                        "reason": "bf16 kernels exist but bf16 graph conversion is not implemented",
                        "probe": probe,
                    }
            timings[f"{v}_s"] = round(time.perf_counter() - t0, 2)
            bar.update()
        if evaluator is not None:
            write_manifest(tmp, base)
            scores: dict[str, Any] = {}
            for v in base["variants"]:
                bar.set_postfix_str(f"evaluate {v}")
                t0 = time.perf_counter()
                figures = evaluator(tmp, v)
                scores[v] = figures.pop("scores", None)
                base["variants"][v]["eval"] = figures
                timings[f"eval_{v}_s"] = round(time.perf_counter() - t0, 2)
                bar.update()
            if "int8" in base["variants"] and scores.get("int8") and scores.get("fp32"):
                val = base["variants"]["int8"]["validation"]
                val.update(rerank_agreement(scores["fp32"], scores["int8"]))
                val["failed"] = check_int8(val)
        _drop_failed_int8(tmp, base)
        base["timings"] = timings
        manifest = write_manifest(tmp, base)
        bar.update()
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported bundle", extra={"path": str(out), "bundle_id": manifest["bundle_id"]})
    return manifest


def rerank_agreement(ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
                     tol: float = INT8_BOUNDS.max_itm_logit_diff) -> dict[str, float]:
    """How often ``other``'s top-1 after ITM re-ranking is ``ref``'s, per direction (score matrices
    ``[queries, gallery]``, -100 outside the shortlist). ``strict``: the same item (argmax takes the lowest id
    among ties, as the ranking rule does). The bound uses the near form: the same item, or one that ``ref``
    scores within ``tol`` of its best, since a model whose logits tie cannot order those either."""
    out = {}
    for d in ("t2i", "i2t"):
        a, b = np.asarray(ref[d]), np.asarray(other[d])
        pick = b.argmax(1)
        out[f"rerank_top1_strict_agreement_{d}"] = round(float(np.mean(a.argmax(1) == pick)), 4)
        gap = a.max(1) - a[np.arange(len(a)), pick]
        out[f"rerank_top1_agreement_{d}"] = round(float(np.mean(gap <= tol)), 4)
    return out


def _drop_failed_int8(tmp: Path, base: dict[str, Any]) -> None:
    """An int8 variant that misses its bounds on this machine is not shipped; the manifest keeps the figures."""
    int8 = base["variants"].get("int8")
    if int8 is None or not int8["validation"]["failed"]:
        return
    for name in int8["files"].values():
        (tmp / name).unlink(missing_ok=True)
    del base["variants"]["int8"]
    base["variants_not_shipped"]["int8"] = {
        "reason": "missed its accuracy bounds on this machine: " + "; ".join(int8["validation"]["failed"]),
        "validation": int8["validation"],
        "alternative": "fp32 (shipped); see docs/cpu.md",
    }
    log.warning("int8 variant not shipped", extra={"failed": int8["validation"]["failed"],
                                                   "cpu": int8["validation"]["cpu"]["model"]})


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and removed after."""
    try:
        atomic.publish_dir(tmp, out, replace_existing=overwrite)
    except FileExistsError as exc:
        raise ExportError(f"{out} exists (use overwrite/--force to replace it)") from exc


def io_description(model: ALBEF) -> dict[str, Any]:
    """Input/output names and shapes of every graph (symbolic axes as strings), for consumers."""
    cfg = model.config
    n = cfg.vision.num_patches + 1
    w, h, d = cfg.vision.width, cfg.text.hidden_size, cfg.embed_dim
    heads = cfg.text.num_attention_heads
    kv = {name: ["1", heads, n, h // heads] for name in kv_names(model)}
    r = cfg.vision.image_res
    return {
        "image_encoder": {"inputs": {"pixels": ["B", 3, r, r]},
                          "outputs": {"image_emb": ["B", d], "image_tokens": ["B", n, w]}},
        "text_encoder": {"inputs": {"input_ids": ["B", "L"], "attention_mask": ["B", "L"]},
                         "outputs": {"text_emb": ["B", d], "text_tokens": ["B", "L", h]}},
        "itm": {"inputs": {"text_tokens": ["B", "L", h], "text_mask": ["B", "L"], "image_tokens": ["B|1", n, w]},
                "outputs": {"itm_logits": ["B", 2]}},
        "image_kv": {"inputs": {"image_tokens": ["1", n, w]}, "outputs": kv},
        "itm_kv": {"inputs": {"text_tokens": ["K", "L", h], "text_mask": ["K", "L"], **kv},
                   "outputs": {"itm_logits": ["K", 2]}},
    }



# -- retrieval quality of a variant (the official protocol, computed with the runtime) --------------------
def runtime_score_matrices(
    bundle: Any, images: Sequence[Any], texts: Sequence[str], k_test: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spec 4.3 with ONNX Runtime: ITC cosine, then the class-1 ITM logit on each query's top ``k_test``
    candidates (-100 elsewhere). Image->text uses the K/V-cached graph (the image side is computed once)."""
    img_emb, img_tok = bundle.encode_images(list(images), batch_size=batch_size)
    txt_emb, txt_tok, txt_mask = bundle.encode_texts(list(texts), batch_size=batch_size * 2)
    sims = img_emb @ txt_emb.T
    k_i2t = min(k_test, sims.shape[1])
    k_t2i = min(k_test, sims.shape[0])
    i2t = np.full(sims.shape, -100.0, dtype=np.float32)
    t2i = np.full(sims.T.shape, -100.0, dtype=np.float32)
    for i in range(sims.shape[0]):
        top = rank(sims[i], k=k_i2t)
        logits = bundle.itm_scores_for_image(img_tok[i : i + 1], txt_tok[top], txt_mask[top])
        i2t[i, top] = logits[:, 1]
    for j in range(sims.shape[1]):
        top = rank(sims[:, j], k=k_t2i)
        t = np.repeat(txt_tok[j : j + 1], len(top), axis=0)
        m = np.repeat(txt_mask[j : j + 1], len(top), axis=0)
        t2i[j, top] = bundle.itm_scores(t, m, img_tok[top])[:, 1]
    return sims, i2t, t2i


def make_evaluator(eval_json: str | Path, image_root: str | Path | None = None, k_test: int = 16) -> Evaluator:
    """An evaluator for :func:`export_bundle`: R@K of ITC alone and of ITC+ITM re-ranking on an eval set
    (official val/test JSON), with ``albef.model.train.evaluate.itm_eval``."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.train.evaluate import itm_eval

    eval_set = load_eval_set(eval_json, image_root)

    def evaluate(bundle_dir: Path, variant: str) -> dict[str, Any]:
        from albef.model.runtime import Bundle

        bundle = Bundle.load(bundle_dir, variant=variant)
        t0 = time.perf_counter()
        sims, i2t, t2i = runtime_score_matrices(bundle, eval_set.images, eval_set.texts, k_test)
        seconds = time.perf_counter() - t0
        itc = itm_eval(sims, sims.T, eval_set.txt2img, eval_set.img2txt)
        itm = itm_eval(i2t, t2i, eval_set.txt2img, eval_set.img2txt)
        return {
            "data": str(eval_json),
            "images": len(eval_set.images),
            "texts": len(eval_set.texts),
            "k_test": k_test,
            "itc": {k: round(float(v), 3) for k, v in itc.items()},
            "itm": {k: round(float(v), 3) for k, v in itm.items()},
            "seconds": round(seconds, 2),
            "scores": {"i2t": i2t, "t2i": t2i},  # taken out by export_bundle for the int8 agreement figures
        }

    return evaluate
