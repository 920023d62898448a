"""Fixtures and helpers for the index tests (import them into a test module with ``from tests.helpers.index
import ...``). The model bundle is the shared ``tiny_bundle`` (random albef-tiny exported once per session)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def index_bundle_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random bundle: the shared ``tiny_bundle`` if conftest has it, else exported here."""
    try:
        return Path(request.getfixturevalue("tiny_bundle"))
    except pytest.FixtureLookupError:
        import torch
        from albef.model.export import export_bundle
        from albef.model.factory import create_model

        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("index-bundle") / "albef-tiny-random"
        export_bundle(create_model("albef-tiny"), out, variants=["fp32"], progress=False)
        return out


@pytest.fixture(scope="session")
def index_bundle(index_bundle_dir: Path):
    from albef.model.runtime import Bundle

    return Bundle.load(index_bundle_dir, intra_op_threads=1)


@pytest.fixture(scope="session")
def other_bundle_dir(index_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different, valid bundle: same graphs but another vocab.txt file, hence another bundle id."""
    from albef.model.runtime import bundle_id_from_files

    out = tmp_path_factory.mktemp("other-bundle") / "bundle"
    shutil.copytree(index_bundle_dir, out)
    vocab = out / "vocab.txt"
    vocab.write_bytes(vocab.read_bytes() + b"[extra]\n")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["vocab.txt"] = {"sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
                                      "bytes": vocab.stat().st_size}
    manifest["bundle_id"] = bundle_id_from_files(manifest["files"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


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
            p.with_suffix(".txt").write_text(f"a picture number {seed0 + i}\nanother view of item {seed0 + i}\n")
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
