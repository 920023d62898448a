"""What an index build takes and gives: the options, what it needs from a model bundle, the result.

Shared by the steps of a build (:mod:`.plan`, :mod:`.encode`, :mod:`.publish`) and by :mod:`.delete`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from albef.index import ann
from albef.index.errors import IndexError_
from albef.index.features import TEXT_FEATURES, TOKEN_DTYPES
from albef.model.image import DEFAULT_FORMATS
from albef.settings import INDEX_BUILD_DEFAULTS as _D

KINDS = ("image", "text")


class Encoder(Protocol):
    """What the builder needs from a model bundle (``albef.model.runtime.Bundle`` provides it)."""

    bundle_id: str
    embed_dim: int
    image_res: int
    image_tokens_shape: tuple[int, int]
    text_width: int
    max_tokens: int

    def preprocess(self, images: Sequence[Any], *, exif_transpose: bool = True) -> np.ndarray: ...
    def encode_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class ShardEncoder(Protocol):
    """Step 2 of a build/add: encodes the plan's shards not committed yet into ``wdir/shards``, each one
    committed with :func:`albef.index.encode.save_npz` in the layout of :mod:`albef.index.encode`, and returns
    what the report records of how (``{"name": "local", ...}``). The builder's default encodes in this process
    (:func:`albef.index.builder.encode_locally`); :class:`albef.index.ray_build.RayEncoder` on a Ray cluster."""

    def __call__(
        self,
        wdir: Path,
        plan: dict[str, Any],
        bundle: Encoder,
        opts: BuildOptions,
        known: dict[str, int],
        bar: Any,
    ) -> dict[str, Any]: ...


@dataclass
class BuildOptions:
    # The numbers' defaults are albef.settings.IndexBuildSettings' (the CLI's too, there overridable by
    # ALBEF_INDEX_*); the ANN policy's stay in albef.index.ann.
    batch_size: int = _D.batch_size  # images per encoder call
    text_batch_size: int = _D.text_batch_size
    shard_size: int = _D.shard_size  # images per committed shard
    text_shard_size: int = _D.text_shard_size
    workers: int = _D.workers  # image reading/decoding threads
    token_dtype: str = "fp16"  # image token features: fp16 | int8
    text_features: str = "tokens"  # text re-rank features: tokens (fp16) | ids (re-encoded at query time)
    factory: str | None = None  # FAISS factory string; None = choose under max_memory
    max_memory: str | None = None  # None: the index's recorded budget (add), else ann.DEFAULT_MAX_MEMORY
    flat_below: int = ann.FLAT_BELOW
    target_recall: float = _D.target_recall
    keep_versions: int = _D.keep_versions
    image_root: str | None = None
    progress: bool = True
    exif_transpose: bool = True  # False: the official loader (EXIF orientation ignored)
    image_formats: tuple[str, ...] = DEFAULT_FORMATS  # decoders an image may reach; others are refused

    def check(self) -> None:
        if self.token_dtype not in TOKEN_DTYPES:
            raise IndexError_(f"token dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        if self.text_features not in TEXT_FEATURES:
            raise IndexError_(f"text features must be one of {TEXT_FEATURES}, got {self.text_features!r}")
        for name in (
            "batch_size",
            "text_batch_size",
            "shard_size",
            "text_shard_size",
            "workers",
            "keep_versions",
        ):
            if int(getattr(self, name)) < 1:
                raise IndexError_(f"{name} must be at least 1")
        if self.max_memory is not None:
            ann.parse_size(self.max_memory)

    def plan_key(self) -> dict[str, Any]:
        """Options that change the result: a resumed build must use the same ones."""
        keys = (
            "batch_size",
            "text_batch_size",
            "shard_size",
            "text_shard_size",
            "token_dtype",
            "text_features",
            "image_root",
            "exif_transpose",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass
class Result:
    version: str
    index_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
