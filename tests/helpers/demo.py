"""Helpers of the demo and browser tests. The demo cache itself (the shipped tiny model exported, a small
synthetic gallery, its index), prepared once per session with :func:`albef.demo.prepare`, is the
``prepared_demo`` fixture of tests/conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from albef.demo import DEMO_SYNTH
from tests.helpers import REPO

# A smaller gallery than the demo's (3000 scenes): same generator and seed, the 10% test split = 30 images.
TEST_SYNTH = {**DEMO_SYNTH, "images": 300}
ARTIFACTS = REPO / "test-artifacts"


@dataclass
class PreparedDemo:
    cache: Path
    result: object  # albef.demo.DemoResult of the cold run
    lines: list[str]  # the progress lines the cold run printed
