"""Helpers of the index tests: small image folders, and snapshots of what a reader of an index version sees.
The bundle fixtures (``index_bundle_dir``, ``other_bundle_dir``, ``index_bundle``) are in the conftest.py files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A small PNG with a random colour field and a rectangle (different seeds give different bytes)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
    arr[y : y + size[1] // 2, x : x + size[0] // 2] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_folder(root: Path, n: int, seed0: int = 0, captions: bool = True) -> Path:
    """``n`` images in two sub-folders, every other one with a same-name .txt of two captions."""
    for i in range(n):
        p = make_image(root / f"part{i % 2}" / f"img{i:03d}.png", seed0 + i)
        if captions and i % 2 == 0:
            p.with_suffix(".txt").write_text(
                f"a picture number {seed0 + i}\nanother view of item {seed0 + i}\n"
            )
    return root


def snapshot(index_dir: Path, search_queries: int | None = None) -> dict:
    """Everything a reader of the current version sees: version, counts, metadata rows, vectors, re-rank
    features of every item, and a search (text vectors against the image index)."""
    from albef.index.reader import IndexReader

    with IndexReader.open(index_dir) as r:
        items = r.items(range(r.manifest["next_id"]))
        img = [it["id"] for it in items if it["kind"] == "image"]
        txt = [it["id"] for it in items if it["kind"] == "text"]
        text_vectors = np.stack([r.vector("text", i) for i in txt])
        return {
            "version": r.version,
            "counts": r.manifest["counts"],
            "items": items,
            "image_vectors": np.stack([r.vector("image", i) for i in img]),
            "text_vectors": text_vectors,
            "image_tokens": r.image_tokens(img),
            "text_features": r.text_features(txt),
            "search": r.search("image", text_vectors[:search_queries], 5),
        }


def assert_same_snapshot(a: dict, b: dict, *, version: bool = True) -> None:
    if version:
        assert a["version"] == b["version"]
    assert a["counts"] == b["counts"] and a["items"] == b["items"]
    for key in ("image_vectors", "text_vectors", "image_tokens"):
        assert np.array_equal(a[key], b[key]), key
    for x, y in zip(a["text_features"] + a["search"], b["text_features"] + b["search"], strict=True):
        assert np.array_equal(x, y)
