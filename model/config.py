"""Model configurations as data: one JSON file per architecture in ``configs/`` (open_clip style).

This module is torch-free so that the runtime and the service can read a bundle's config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    image_res: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_res // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    fusion_layer: int = 6
    encoder_width: int = 768
    pad_token_id: int = 0


@dataclass(frozen=True)
class AlbefConfig:
    name: str = "albef-base"
    embed_dim: int = 256
    temp: float = 0.07
    max_tokens: int = 30
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlbefConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kwargs = dict(data)
        kwargs["vision"] = _sub(VisionConfig, kwargs.get("vision", {}))
        kwargs["text"] = _sub(TextConfig, kwargs.get("text", {}))
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        return cls(**kwargs)

    def with_image_res(self, image_res: int | None) -> AlbefConfig:
        if image_res is None or image_res == self.vision.image_res:
            return self
        return replace(self, vision=replace(self.vision, image_res=int(image_res)))


def _sub(klass: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(klass)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {klass.__name__} keys: {sorted(unknown)}")
    return klass(**data)


def list_models() -> list[str]:
    """Names of the built-in configurations."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name_or_config: str | Path | dict[str, Any] | AlbefConfig) -> AlbefConfig:
    """A built-in name (``albef-base``), a path to a JSON config, a dict, or a config."""
    if isinstance(name_or_config, AlbefConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return AlbefConfig.from_dict(name_or_config)
    path = Path(name_or_config)
    if str(name_or_config) in list_models():
        path = CONFIG_DIR / f"{name_or_config}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown model config {str(name_or_config)!r}; built-in: {', '.join(list_models())}"
        )
    return AlbefConfig.from_dict(json.loads(path.read_text()))
