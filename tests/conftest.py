"""Shared fixtures. Session-scoped artefacts are built once per test run in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ALBEF_LOG_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vocab_path() -> Path:
    from albef.model.text import default_vocab_path

    return default_vocab_path()


@pytest.fixture(scope="session")
def tokenizer(vocab_path: Path):
    from albef.model.text import AlbefTokenizer

    return AlbefTokenizer.from_vocab(vocab_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised albef-tiny (seed 0) saved in our format."""
    import torch
    from albef.model.checkpoint import save_albef
    from albef.model.factory import create_model

    torch.manual_seed(0)
    model = create_model("albef-tiny")
    out = tmp_path_factory.mktemp("ckpt") / "albef-tiny-random"
    save_albef(model, out, source={"init": "random", "seed": 0})
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, vocab_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random albef-tiny exported once as a model bundle (fp32 + int8) for the ONNX runtime."""
    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    out = tmp_path_factory.mktemp("bundle") / "albef-tiny-random"
    export_bundle(
        create_model(None, tiny_checkpoint), out, variants=["fp32", "int8"], vocab=vocab_path,
        checkpoint=tiny_checkpoint, progress=False,
    )
    return out
