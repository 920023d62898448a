"""The match probability and the public view of items (the ranking rule itself: tests/test_ranking.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from albef.service.engine import match_probability, public_item


def test_match_probability_is_the_softmax_of_class_one() -> None:
    logits = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, -1.0], [-800.0, 800.0], [800.0, -800.0]], np.float32)
    p = match_probability(logits)
    assert p[0] == pytest.approx(0.5)
    assert p[1] == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3)))
    assert p[2] == pytest.approx(math.exp(-1) / (math.exp(2) + math.exp(-1)))
    assert p[3] == pytest.approx(1.0) and p[4] == pytest.approx(0.0) and np.isfinite(p).all()


def test_public_items_hide_local_paths() -> None:
    local = public_item({"id": 4, "kind": "image", "path": "/data/x.png", "source": "/data/a.json", "sha256": "s"})
    assert local["image_url"] == "/v1/items/4/image" and local["uri"] is None
    assert "/data" not in str(local)
    remote = public_item({"id": 5, "kind": "image", "path": "https://example.org/y.jpg", "sha256": "s"})
    assert remote["uri"] == "https://example.org/y.jpg" and remote["image_url"] is None
    text = public_item({"id": 6, "kind": "text", "path": "/data/x.png", "caption": "a dog", "image_id": 4,
                        "sha256": "s"})
    assert text["image_url"] is None and text["uri"] is None and text["image_id"] == 4
