"""Helpers shared by the tests that are not fixtures (those live in the conftest.py files)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
# `python SLOW_SHARDS SECONDS ALBEF_ARGS...`: albef with a pause after each committed index shard
SLOW_SHARDS = REPO / "tests" / "helpers" / "slow_shards.py"
