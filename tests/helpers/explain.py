"""Helpers of the explain tests: the official Grad-CAM computed with torch autograd on the eager model, and a
copy of a bundle as bundle format 1 wrote it (no explain graph)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any


def torch_gradcam(
    model: Any, layer: int, text_tokens: Any, text_mask: Any, image_tokens: Any
) -> dict[str, Any]:
    """The official recipe on the unmodified eager model (one pair): keep the chosen fusion layer's
    cross-attention probabilities (the tensor multiplied with V; a forward hook on its dropout, which is the
    identity in eval mode), ``retain_grad``, backpropagate the summed match logit, then
    ``cams[..., 1:] * grads[..., 1:].clamp(min=0)``, masked, averaged over the heads; the overall map is the mean
    over the text's real tokens (the official grounding code: ``gradcam.mean(1).mean(1)`` on an unpadded text).

    Returns numpy arrays: ``logits`` [2], ``attention`` and ``grad`` [heads, L, N], ``per_token`` [T, s, s]
    (the T real tokens) and ``overall`` [s, s]."""
    import torch

    model.eval()
    kept: list[Any] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        output.retain_grad()
        kept.append(output)

    dropout = model.text_encoder.fusion_layers[layer].crossattention.self.dropout
    handle = dropout.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model.itm_logits(text_tokens, text_mask, image_tokens)
            model.zero_grad()
            logits[:, 1].sum().backward()
    finally:
        handle.remove()
        model.zero_grad()
    probs, grads = kept[0].detach(), kept[0].grad
    heads, length, n = probs.shape[1:]
    side = int(round((n - 1) ** 0.5))
    mask = text_mask.view(1, 1, -1, 1, 1).to(probs.dtype)
    cams = probs[:, :, :, 1:].reshape(1, heads, length, side, side) * mask
    grads_pos = grads[:, :, :, 1:].clamp(min=0).reshape(1, heads, length, side, side) * mask
    gradcam = (cams * grads_pos)[0].mean(0)  # [L, s, s]
    real = int(text_mask.sum())
    return {
        "logits": logits.detach()[0].numpy(),
        "attention": probs[0].numpy(),
        "grad": grads[0].numpy(),
        "per_token": gradcam[:real].numpy(),
        "overall": gradcam[:real].mean(0).numpy(),
    }


def format1_copy(bundle: Path, dst: Path) -> Path:
    """``bundle`` as bundle format 1 wrote it: no explain graph or manifest section, ``format_version`` 1, the
    file list and the bundle id hashed again."""
    from albef.model.runtime import bundle_id_from_files

    shutil.copytree(bundle, dst)
    (dst / "explain.onnx").unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("explain")
    manifest["io"].pop("explain")
    manifest["format_version"] = 1
    files = {}
    for f in sorted(dst.iterdir()):
        if f.name != "manifest.json":
            files[f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
    manifest["files"] = files
    manifest["bundle_id"] = bundle_id_from_files(files)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst
