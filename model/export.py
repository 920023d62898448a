"""Export an ALBEF model to a model bundle: five retrieval ONNX graphs and the explain graph, tokenizer,
preprocessing and a manifest.

Each graph is a small ``nn.Module`` adapter around one inference path of :class:`ALBEF`, exported with
the legacy TorchScript exporter (``dynamo=False``, opset 17) with dynamic batch and text-length axes.
Before anything is published, PyTorch and ONNX Runtime run the same inputs; the fp32 export fails if
embeddings or ITM logits differ by more than ``FP32_TOLERANCE``. The bundle is built in
``OUT_DIR.tmp-XXXX`` and renamed into place, so a failed export leaves nothing behind.

The explain graph (:mod:`.export_explain`: the ITM match logit's Grad-CAM inputs, gradient included) is
traced separately, float32 only, and held to torch autograd within the same tolerance; ``explain=False``
leaves it out (the bundle then serves search but not ``/v1/explain``).

Faster variants: ``int8`` (:mod:`albef.model.quantize`: MatMul/Gemm weights int8 in a 7-bit range,
activations quantised on the fly; every graph, or with the ``rerank`` scope only the re-ranking graphs),
validated on the machine that exports it against :data:`~albef.model.quantize.INT8_BOUNDS`; a variant that
misses them is not shipped (the manifest says why). ``bf16`` is shipped only if ONNX Runtime on this CPU runs
bf16 MatMul faster than fp32; otherwise the probe's result is recorded in the manifest instead.

This module runs the steps; each job has its own module: the adapters and their I/O
(:mod:`.export_adapters`), the ONNX graphs (:mod:`.export_onnx`), validation (:mod:`.export_validate`),
the manifest and the other bundle files (:mod:`.export_manifest`), the int8 and bf16 variants
(:mod:`.export_variants`) and the runtime evaluator (:mod:`.export_eval`). Their public names are
re-exported here, the import path of every user.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from albef import atomic
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
    num_fusion_layers,
)
from albef.model.export_eval import Evaluator, make_evaluator, runtime_score_matrices
from albef.model.export_explain import (
    ExplainAdapter,
    default_explain_layer,
    explain_io,
    explain_layer_for,
    export_explain,
    validate_explain,
)
from albef.model.export_manifest import (
    base_manifest,
    library_versions,
    resolve_vocab,
    source_info,
    write_manifest,
    write_text_files,
)
from albef.model.export_onnx import DEFAULT_OPSET, export_graphs
from albef.model.export_validate import (
    FP32_TOLERANCE,
    ExportError,
    check_fp32,
    rerank_agreement,
    torch_reference,
    validate,
)
from albef.model.export_variants import (
    add_int8,
    add_int8_agreement,
    decide_bf16,
    drop_failed_int8,
    probe_bf16,
)
from albef.model.quantize import check_scope
from albef.model.runtime import VARIANTS

__all__ = [
    "DEFAULT_OPSET",
    "FP32_TOLERANCE",
    "ExportError",
    "Evaluator",
    "export_bundle",
    "ImageEncoderAdapter",
    "TextEncoderAdapter",
    "ItmAdapter",
    "ImageKVAdapter",
    "ItmKVAdapter",
    "ExplainAdapter",
    "default_explain_layer",
    "num_fusion_layers",
    "kv_names",
    "example_inputs",
    "io_description",
    "export_graphs",
    "probe_bf16",
    "torch_reference",
    "validate",
    "check_fp32",
    "rerank_agreement",
    "library_versions",
    "source_info",
    "write_manifest",
    "runtime_score_matrices",
    "make_evaluator",
]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One export in progress: the bundle being built in ``tmp`` and what its steps share."""

    model: ALBEF
    tmp: Path
    bar: Any  # the progress bar
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    files32: dict[str, str] = field(default_factory=dict)
    ref: dict[str, Any] = field(default_factory=dict)  # PyTorch's outputs, shared by every validation

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - t0, 2)


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
    int8_scope: str = "all",
    progress: bool = True,
    explain: bool = True,
    explain_layer: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` into a bundle at ``out_dir`` and return its manifest.

    ``evaluator(bundle_tmp_dir, variant) -> figures`` (optional) measures each variant's retrieval quality
    (e.g. R@1 on the synthetic benchmark); its result is stored under ``variants[v]["eval"]``.
    ``explain_layer``: the fusion layer (0-based among them) whose cross-attention the explain graph
    explains; default :func:`default_explain_layer` (the official third, or the second-to-last of fewer).
    ``int8_scope``: ``"all"`` quantises every graph, ``"rerank"`` only the re-ranking graphs (the int8
    variant then shares fp32's encoders, features and indexes; see :mod:`albef.model.quantize`).
    """
    from albef.progress import progress_bar

    variants = _checked_variants(variants)
    check_scope(int8_scope)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (use overwrite/--force to replace it)")
    vocab_path = resolve_vocab(vocab, checkpoint)
    if not vocab_path.is_file():
        raise ExportError(f"vocab file not found: {vocab_path}")
    if explain:
        explain_layer = explain_layer_for(model, explain_layer)  # a bad layer fails here, before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    steps = ["export fp32", "validate fp32", *(["explain"] if explain else [])]
    steps += [*[v for v in variants if v != "fp32"], "manifest"]
    bar = progress_bar(
        total=len(steps) + (len(variants) if evaluator else 0), desc="export", enabled=progress
    )
    job = _Job(model, tmp, bar)
    try:
        _export_fp32(job, vocab_path, checkpoint, opset)
        _validate_fp32(job, tolerance)
        if explain:
            _add_explain(job, explain_layer, tolerance)
        for v in variants:
            if v != "fp32":
                _add_variant(job, v, int8_per_channel, int8_scope)
        if evaluator is not None:
            _evaluate(job, evaluator)
        manifest = _finish(job)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported bundle", extra={"path": str(out), "bundle_id": manifest["bundle_id"]})
    return manifest


def _checked_variants(variants: Sequence[str]) -> Sequence[str]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in variants:
        return ["fp32", *variants]  # fp32 is the reference every other variant is validated against
    return variants


def _export_fp32(job: _Job, vocab_path: Path, checkpoint: str | Path | None, opset: int) -> None:
    """Tokenizer, preprocessing and the fp32 graphs, then a provisional manifest (validation loads the
    bundle through the runtime)."""
    with job.timed("export_s"):
        write_text_files(job.tmp, vocab_path, job.model.config)
        job.bar.set_postfix_str("exporting graphs")
        job.files32 = export_graphs(job.model, job.tmp, opset)
    job.bar.update()
    job.manifest = base_manifest(job.model, checkpoint, opset, job.files32)
    job.manifest["itm_forms"] = itm_forms(job.model)  # format 3: the runtime picks a graph by text length
    write_manifest(job.tmp, job.manifest)


def _validate_fp32(job: _Job, tolerance: float) -> None:
    with job.timed("validate_fp32_s"):
        job.ref = torch_reference(job.model)
        figures = validate(job.ref, job.tmp, "fp32")
        job.manifest["variants"]["fp32"]["validation"] = figures
    check_fp32(figures, tolerance)
    job.bar.update()


def _add_explain(job: _Job, layer: int | None, tolerance: float) -> None:
    """The explain graph, then its check against torch autograd (through the runtime, so the manifest
    describes it first)."""
    job.bar.set_postfix_str("explain")
    with job.timed("explain_s"):
        section = export_explain(job.model, job.tmp, layer)
        job.manifest["explain"] = section
        job.manifest["io"]["explain"] = explain_io(job.model)
        write_manifest(job.tmp, job.manifest)
        section["validation"] = validate_explain(job.model, job.tmp, section["fusion_layer"], tolerance)
    job.bar.update()


def _add_variant(job: _Job, variant: str, int8_per_channel: bool, int8_scope: str) -> None:
    job.bar.set_postfix_str(variant)
    with job.timed(f"{variant}_s"):
        if variant == "int8":
            add_int8(job.tmp, job.manifest, job.files32, job.ref, int8_per_channel, int8_scope)
        elif variant == "bf16":
            decide_bf16(job.manifest)
    job.bar.update()


def _evaluate(job: _Job, evaluator: Evaluator) -> None:
    """Every shipped variant's retrieval quality; with fp32's and int8's scores, their re-rank agreement."""
    write_manifest(job.tmp, job.manifest)
    scores: dict[str, Any] = {}
    for v in job.manifest["variants"]:
        job.bar.set_postfix_str(f"evaluate {v}")
        with job.timed(f"eval_{v}_s"):
            figures = evaluator(job.tmp, v)
            scores[v] = figures.pop("scores", None)
            job.manifest["variants"][v]["eval"] = figures
        job.bar.update()
    add_int8_agreement(job.manifest, scores)


def _finish(job: _Job) -> dict[str, Any]:
    """The final manifest: without an int8 variant that missed its bounds, with the timings."""
    drop_failed_int8(job.tmp, job.manifest)
    job.manifest["timings"] = job.timings
    manifest = write_manifest(job.tmp, job.manifest)
    job.bar.update()
    return manifest


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and removed after."""
    try:
        atomic.publish_dir(tmp, out, replace_existing=overwrite)
    except FileExistsError as exc:
        raise ExportError(f"{out} exists (use overwrite/--force to replace it)") from exc
