"""Fixtures of the demo and browser tests: the demo cache (the shipped tiny model exported, a small synthetic
gallery, its index) prepared once per session with :func:`albef.demo.prepare`.

Import into a test module with ``from tests.helpers.demo import ...`` (fixtures by name, so pytest sees them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

# A smaller gallery than the demo's (3000 scenes): same generator and seed, the 10% test split = 30 images.
TEST_SYNTH = {"images": 300, "seed": 0, "size": 128}
ARTIFACTS = REPO / "test-artifacts"


@dataclass
class PreparedDemo:
    cache: Path
    result: object  # albef.demo.DemoResult of the cold run
    lines: list[str]  # the progress lines the cold run printed


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from albef.demo import shipped_checkpoint

    path = shipped_checkpoint()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), \
        f"the shipped tiny checkpoint is missing: {path}"
    return path


@pytest.fixture(scope="session")
def prepared_demo(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedDemo:
    """A cold ``prepare`` into an empty cache (export, gallery, index)."""
    from albef.demo import prepare

    cache = tmp_path_factory.mktemp("demo") / "cache"
    lines: list[str] = []
    result = prepare(cache, checkpoint=demo_checkpoint, synth=TEST_SYNTH, progress=False, say=lines.append)
    return PreparedDemo(cache, result, lines)
