"""Per-item arrays of a segment: embeddings and re-rank features, memory-mapped ``.npy`` files.

A segment (``segments/seg-000001/``) holds what one build/add encoded, in id order:

- ``image_ids.npy`` int64 [n]; ``image_emb.npy`` float32 [n, D] (ITC embeddings, L2-normalised);
  ``image_tokens.npy`` [n, N, W]: ViT token features for ITM re-ranking, float16 (default) or int8 with
  ``image_scales.npy`` float32 [n, N] (symmetric per-token scale: x ~= q * scale, q in [-127, 127]).
- ``text_ids.npy``, ``text_emb.npy``; ``text_token_ids.npy`` int32 [n, L] and ``text_mask.npy`` uint8 [n, L]
  (always; 2.5 bytes per token); ``text_tokens.npy`` float16 [n, L, H] (text encoder output) unless the index
  was built with ``text_features="ids"``, in which case re-ranking re-encodes the ids at query time.
- ``segment.json``: counts, dtypes and shapes.

Rows whose items were deleted stay in the segment but no version points at them any more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_DTYPES = ("fp16", "int8")
TEXT_FEATURES = ("tokens", "ids")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token (last axis): ``scale = max|x| / 127``; returns (q int8, scale float32)."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


def encode_tokens(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 token features -> stored form (fp16, or int8 + scales)."""
    if dtype == "fp16":
        return np.asarray(x, dtype=np.float32).astype(np.float16), None
    if dtype == "int8":
        return quantize_int8(x)
    raise ValueError(f"unknown token dtype {dtype!r} (choose from {TOKEN_DTYPES})")


class SegmentWriter:
    """Writes a segment's arrays row block by row block into pre-sized .npy memmaps (no full copy in RAM)."""

    def __init__(
        self,
        path: Path,
        *,
        n_images: int,
        n_texts: int,
        embed_dim: int,
        image_tokens_shape: tuple[int, int],
        text_len: int,
        text_width: int,
        token_dtype: str = "fp16",
        text_features: str = "tokens",
    ) -> None:
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"unknown token dtype {token_dtype!r} (choose from {TOKEN_DTYPES})")
        if text_features not in TEXT_FEATURES:
            raise ValueError(f"unknown text features {text_features!r} (choose from {TEXT_FEATURES})")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.info: dict[str, Any] = {
            "n_images": n_images,
            "n_texts": n_texts,
            "embed_dim": embed_dim,
            "image_tokens_shape": list(image_tokens_shape),
            "text_len": text_len,
            "text_width": text_width,
            "token_dtype": token_dtype,
            "text_features": text_features,
        }
        n_tok, width = image_tokens_shape
        self.arrays: dict[str, np.ndarray] = {}
        self._open("image_ids", (n_images,), np.int64)
        self._open("image_emb", (n_images, embed_dim), np.float32)
        self._open("image_tokens", (n_images, n_tok, width), np.float16 if token_dtype == "fp16" else np.int8)
        if token_dtype == "int8":
            self._open("image_scales", (n_images, n_tok), np.float32)
        self._open("text_ids", (n_texts,), np.int64)
        self._open("text_emb", (n_texts, embed_dim), np.float32)
        self._open("text_token_ids", (n_texts, text_len), np.int32)
        self._open("text_mask", (n_texts, text_len), np.uint8)
        if text_features == "tokens":
            self._open("text_tokens", (n_texts, text_len, text_width), np.float16)
        self.rows = {"image": 0, "text": 0}

    def _open(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.arrays[name] = np.lib.format.open_memmap(
            self.path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape
        )

    def add_images(
        self, ids: np.ndarray, emb: np.ndarray, tokens: np.ndarray, scales: np.ndarray | None = None
    ) -> None:
        """``tokens`` already in the stored dtype (see :func:`encode_tokens`)."""
        a, b = self.rows["image"], self.rows["image"] + len(ids)
        self.arrays["image_ids"][a:b] = ids
        self.arrays["image_emb"][a:b] = emb
        self.arrays["image_tokens"][a:b] = tokens
        if "image_scales" in self.arrays:
            if scales is None:
                raise ValueError("int8 tokens need their scales")
            self.arrays["image_scales"][a:b] = scales
        self.rows["image"] = b

    def add_texts(
        self,
        ids: np.ndarray,
        emb: np.ndarray,
        token_ids: np.ndarray,
        mask: np.ndarray,
        tokens: np.ndarray | None,
    ) -> None:
        a, b = self.rows["text"], self.rows["text"] + len(ids)
        self.arrays["text_ids"][a:b] = ids
        self.arrays["text_emb"][a:b] = emb
        self.arrays["text_token_ids"][a:b] = token_ids
        self.arrays["text_mask"][a:b] = mask
        if "text_tokens" in self.arrays:
            if tokens is None:
                raise ValueError("this segment stores text tokens")
            self.arrays["text_tokens"][a:b] = tokens
        self.rows["text"] = b

    def close(self) -> dict[str, Any]:
        if self.rows["image"] != self.info["n_images"] or self.rows["text"] != self.info["n_texts"]:
            raise RuntimeError(
                f"segment incomplete: wrote {self.rows}, expected "
                f"{self.info['n_images']} images and {self.info['n_texts']} texts"
            )
        for arr in self.arrays.values():
            arr.flush()  # type: ignore[attr-defined]
        self.info["bytes"] = {name: (self.path / f"{name}.npy").stat().st_size for name in self.arrays}
        self.arrays.clear()
        (self.path / "segment.json").write_text(json.dumps(self.info, indent=2, sort_keys=True) + "\n")
        return self.info


class Segment:
    """Read side: arrays opened lazily with ``mmap_mode='r'`` (the OS pages in what queries touch)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.info: dict[str, Any] = json.loads((self.path / "segment.json").read_text())
        except FileNotFoundError as exc:
            from albef.index.errors import IndexFormatError

            raise IndexFormatError(f"segment {self.path} is missing or incomplete") from exc
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            arr = np.load(self.path / f"{name}.npy", mmap_mode="r")
            self._arrays[name] = arr
        return arr

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.npy").is_file()

    def image_tokens(self, rows: np.ndarray) -> np.ndarray:
        """[k, N, W] for the given rows: float16 as stored, or float32 dequantised from int8."""
        tok = self.array("image_tokens")[rows]
        if tok.dtype == np.int8:
            return dequantize_int8(tok, self.array("image_scales")[rows])
        return np.asarray(tok)
