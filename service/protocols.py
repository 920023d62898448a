"""What the service needs from a model bundle and from an index reader, as typing Protocols.

``albef.model.runtime.Bundle`` and ``albef.index.IndexReader`` provide them; the service is typed against
these so that it depends on what it calls, and test doubles need only that much.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

__all__ = ["Kind", "TextTokenizer", "ModelBundle", "IndexView"]

Kind = Literal["image", "text"]


class TextTokenizer(Protocol):
    def __call__(self, texts: Sequence[str], clean: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


class ModelBundle(Protocol):
    """The model side: encoders, the ITM head, and what ``/v1/index`` and the start-up log report."""

    bundle_id: str
    variant: str
    config: Any  # albef.model.config.AlbefConfig (its ``name``)
    embed_dim: int
    image_res: int
    max_tokens: int
    tokenizer: TextTokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
    def preprocess(self, images: Sequence[Any], *, exif_transpose: bool = True) -> np.ndarray: ...
    def encode_pixels(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]: ...
    def encode_ids(self, ids: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]: ...
    def itm_scores(self, text_tokens: Any, text_mask: Any, image_tokens: Any) -> np.ndarray: ...
    def image_kv(self, image_tokens_1: Any) -> list[np.ndarray]: ...
    def itm_scores_for_image(
        self, image_tokens_1_or_kv: Any, text_tokens: Any, text_mask: Any
    ) -> np.ndarray: ...
    def validation_summary(self) -> dict[str, Any]: ...


class IndexView(Protocol):
    """One served index version: ANN search, stored features and item metadata."""

    index_dir: Path
    version: str
    manifest: dict[str, Any]

    def count(self, kind: Kind) -> int: ...
    def search(self, kind: Kind, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def search_filtered(
        self, kind: Kind, query: np.ndarray, k: int, flt: Any, exclude: Sequence[int] = ()
    ) -> Any: ...  # albef.index.reader.FilteredHits
    def vector(self, kind: Kind, item_id: int) -> np.ndarray: ...
    def image_tokens(self, ids: Sequence[int], dtype: Any = np.float32) -> np.ndarray: ...
    def text_features(self, ids: Sequence[int], dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]: ...
    def item(self, item_id: int) -> dict[str, Any] | None: ...
    def items(self, ids: Sequence[int]) -> list[dict[str, Any]]: ...
    def image_path(self, item_id: int) -> Path | None: ...
    def close(self) -> None: ...
