"""Fixtures of the index tests (the bundle directories are shared: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def index_bundle(index_bundle_dir: Path):
    from albef.model.runtime import Bundle

    return Bundle.load(index_bundle_dir, intra_op_threads=1)
