"""ALBEF: configs, the torch model, checkpoints, export and the torch-free ONNX runtime.

Torch-dependent names are imported lazily so that ``albef.model.runtime`` and the service stay torch-free.
"""

from __future__ import annotations

from typing import Any

from albef.model.config import AlbefConfig, get_config, list_models

__all__ = ["AlbefConfig", "get_config", "list_models", "create_model", "ALBEF"]


def __getattr__(name: str) -> Any:
    if name == "create_model":
        from albef.model.factory import create_model

        return create_model
    if name == "ALBEF":
        from albef.model.albef import ALBEF

        return ALBEF
    raise AttributeError(name)
