"""One factory for every ALBEF model (open_clip style): a config name or file, optional weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from albef.model.albef import ALBEF
from albef.model.checkpoint import (
    fit_pos_embed,
    is_albef_checkpoint,
    load_strict,
    official_to_albef,
    read_albef,
    read_official,
)
from albef.model.config import AlbefConfig, get_config

log = logging.getLogger(__name__)


def create_model(
    name_or_config: str | Path | dict[str, Any] | AlbefConfig | None = None,
    checkpoint: str | Path | None = None,
    image_res: int | None = None,
    *,
    with_mlm: bool = False,
) -> ALBEF:
    """Build an ALBEF model in eval mode.

    Args:
        name_or_config: a built-in name (``albef-base``, ``albef-tiny``), a JSON path, a dict or a config.
            May be None when ``checkpoint`` is in our format (its config is used).
        checkpoint: an official ``.pth`` (pretrain or retrieval container) or our format (a folder with
            ``config.json`` + ``model.safetensors``). Loaded strictly.
        image_res: override the input resolution; ``pos_embed`` is interpolated to it.
        with_mlm: also build the MLM head (pretraining).
    """
    state: dict[str, torch.Tensor] | None = None
    if checkpoint is not None and is_albef_checkpoint(checkpoint):
        meta, state = read_albef(checkpoint)
        config = get_config(meta["model"]) if name_or_config is None else get_config(name_or_config)
        if not with_mlm:
            state = {k: v for k, v in state.items() if not k.startswith("text_encoder.cls.")}
        official = False
    else:
        config = get_config(name_or_config or "albef-base")
        official = checkpoint is not None
    config = config.with_image_res(image_res)
    model = ALBEF(config, with_mlm=with_mlm)
    if checkpoint is not None:
        if official:
            raw, container = read_official(checkpoint)
            state = official_to_albef(raw, model)
            log.info("loading official checkpoint", extra={"path": str(checkpoint), "container": container})
        else:
            state = fit_pos_embed(state or {}, model)
        load_strict(model, state)
    return model.eval()
