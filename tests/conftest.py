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
