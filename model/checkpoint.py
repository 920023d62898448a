"""Checkpoints: the two official containers and our own format (docs/model.md §3).

Official files are ``torch.save`` pickles: pretraining files wrap the state dict in ``{'model': ...}`` with
``text_encoder.bert.*`` keys, momentum copies, queues and the MLM head; the retrieval files are flat. We
unwrap, drop momentum/queue/position_ids keys, rename ``text_encoder.bert.`` -> ``text_encoder.``,
interpolate ``pos_embed`` to the model's resolution, then load strictly: a missing or unexpected key is an
error that names the keys, never a silent partial load (the official ``strict=False`` pitfall).

Our format is a folder with ``config.json`` (model config + provenance) and ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from albef.model.config import AlbefConfig
from albef.model.vit import interpolate_pos_embed

FORMAT = "albef-search"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
MLM_PREFIX = "text_encoder.cls."
# Tied tensors: stored once in our format, restored from their source on load.
TIED_KEYS = {
    "text_encoder.cls.predictions.decoder.weight": "text_encoder.embeddings.word_embeddings.weight",
    "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias",
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending keys."""


def is_albef_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / CONFIG_FILE).is_file()) or p.suffix == ".safetensors"


def _albef_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / CONFIG_FILE, p / WEIGHTS_FILE
    return p.with_name(CONFIG_FILE), p


def read_albef(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our format -> (metadata incl. ``model`` config dict, state dict with tied keys restored)."""
    from safetensors.torch import load_file

    cfg_path, weights = _albef_paths(path)
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an {FORMAT} checkpoint config")
    state = load_file(str(weights))
    for key, source in TIED_KEYS.items():
        if key not in state and source in state and key.startswith(MLM_PREFIX) and meta.get("with_mlm"):
            state[key] = state[source]
    return meta, state


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """An official ``.pth`` -> (raw state dict, container kind 'pretrain' or 'flat')."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with arbitrary objects are refused, not executed
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict, got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], "pretrain"
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], "flat"
    return obj, "flat"


def official_to_albef(
    state: dict[str, torch.Tensor], model: nn.Module, keep_mlm: bool | None = None
) -> dict[str, torch.Tensor]:
    """Drop what inference/fine-tuning does not use, rename, and fit pos_embed to ``model``."""
    if keep_mlm is None:
        keep_mlm = bool(getattr(model, "with_mlm", False))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(MOMENTUM_PREFIXES) or key in QUEUE_KEYS or key.endswith(".position_ids"):
            continue
        if key.startswith("text_encoder.bert."):
            key = "text_encoder." + key[len("text_encoder.bert.") :]
        if key.startswith(MLM_PREFIX) and not keep_mlm:
            continue
        out[key] = value
    return fit_pos_embed(out, model)


def fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    key = "visual_encoder.pos_embed"
    target = dict(model.named_parameters()).get(key)
    if key in state and target is not None and state[key].shape != target.shape:
        num_patches = target.shape[1] - 1
        state = dict(state)
        state[key] = interpolate_pos_embed(state[key], num_patches)
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_preview(shapes)}")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def save_albef(
    model: nn.Module,
    out_dir: str | Path,
    source: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write our format atomically (temp names, then rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: AlbefConfig = model.config  # type: ignore[assignment]
    state = {}
    for k, v in model.state_dict().items():
        if k in TIED_KEYS:
            continue
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "with_mlm": bool(getattr(model, "with_mlm", False)),
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "source": source or {},
    }
    from albef import atomic

    tmp_w = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": FORMAT})
    atomic.replace(tmp_w, out / WEIGHTS_FILE)
    atomic.write_text(out / CONFIG_FILE, json.dumps(meta, indent=2))
    return out


def key_summary(state: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Keys grouped by their first one or two name parts: count and number of elements."""
    groups: dict[str, dict[str, int]] = {}
    for key, value in state.items():
        parts = key.split(".")
        group = ".".join(parts[:2]) if parts[0] == "text_encoder" and len(parts) > 2 else parts[0]
        g = groups.setdefault(group, {"keys": 0, "numel": 0})
        g["keys"] += 1
        g["numel"] += int(value.numel()) if hasattr(value, "numel") else 0
    return groups
