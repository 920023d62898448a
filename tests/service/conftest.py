"""Fixtures of the service tests (the synthetic split and its index are shared: tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.service import ModelSetup

# The tiny model trained on the synthetic benchmark (helper A); the agreement tests use it when it is there.
TRAINED_CHECKPOINT = REPO / "model" / "weights" / "albef-tiny-synth"


@pytest.fixture(scope="session")
def agreement_setup(
    request: pytest.FixtureRequest, service_synth: Path, tmp_path_factory: pytest.TempPathFactory
) -> ModelSetup:
    """The shipped trained tiny checkpoint exported and indexed once, if it is in the tree
    (``ALBEF_TEST_CHECKPOINT`` may name another); else the shared random tiny model and ``service_index``."""
    ckpt = Path(os.environ.get("ALBEF_TEST_CHECKPOINT", TRAINED_CHECKPOINT))
    if not (ckpt / "config.json").is_file():
        return ModelSetup(
            request.getfixturevalue("tiny_checkpoint"),
            request.getfixturevalue("tiny_bundle"),
            request.getfixturevalue("service_index"),
            trained=False,
        )
    from albef.index.builder import BuildOptions, build
    from albef.model.export import export_bundle
    from albef.model.factory import create_model
    from albef.model.runtime import Bundle

    root = tmp_path_factory.mktemp("agreement")
    export_bundle(
        create_model(None, ckpt), root / "bundle", variants=["fp32"], checkpoint=ckpt, progress=False
    )
    build(
        root / "index",
        Bundle.load(root / "bundle"),
        [service_synth / "test.json"],
        BuildOptions(progress=False, workers=2),
    )
    return ModelSetup(ckpt, root / "bundle", root / "index", trained=True)
