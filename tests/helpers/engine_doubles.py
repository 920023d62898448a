"""Doubles of the model bundle for the search engine's unit tests (tests/service/test_engine.py and
test_admission.py): what the engine's stages call, with outputs chosen so a test can read the ranking."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class FakeTokenizer:
    def __call__(self, texts: Sequence[str], clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
        assert not clean, "the engine cleans the text itself"
        return np.ones((len(texts), 4), np.int64), np.ones((len(texts), 4), np.int64)


class FakeBundle:
    """Embeddings are constant; the ITM class-1 logit of a pair is the candidate's first token feature."""

    bundle_id = "fake"
    tokenizer = FakeTokenizer()

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((len(ids), 2), np.float32), np.zeros((len(ids), 4, 3), np.float32)

    def itm_scores(
        self, text_tokens: np.ndarray, text_mask: np.ndarray, image_tokens: np.ndarray
    ) -> np.ndarray:
        return np.stack([np.zeros(len(image_tokens)), image_tokens[:, 0, 0]], axis=1).astype(np.float32)
