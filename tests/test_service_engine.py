"""The ranking rule of the engine on hand-made candidates (ties, k beyond rerank_k) and the match probability."""

from __future__ import annotations

import math

import numpy as np
import pytest
from albef.service.engine import match_probability, order_candidates, public_item


def test_itc_order_breaks_ties_by_id() -> None:
    ids = [7, 3, 9, 5]
    itc = [0.5, 0.9, 0.5, 0.9]
    assert [ids[p] for p in order_candidates(ids, itc, None, k=4, rerank_k=2)] == [3, 5, 7, 9]
    assert [ids[p] for p in order_candidates(ids, itc, None, k=2, rerank_k=2)] == [3, 5]


def test_rerank_orders_the_head_by_itm_then_the_rest_by_itc() -> None:
    ids = [10, 11, 12, 13, 14, 15]
    itc = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # already in ITC order
    itm = [1.0, 3.0, 3.0]  # the head (rerank_k=3): 11 and 12 tie on ITM -> id ascending
    order = [ids[p] for p in order_candidates(ids, itc, itm, k=5, rerank_k=3)]
    assert order == [11, 12, 10, 13, 14]
    assert [ids[p] for p in order_candidates(ids, itc, itm, k=2, rerank_k=3)] == [11, 12]
    # fewer candidates than rerank_k: everything is re-ranked
    assert [ids[p] for p in order_candidates(ids[:2], itc[:2], [0.0, 2.0], k=10, rerank_k=3)] == [11, 10]
    with pytest.raises(ValueError, match="ITM scores"):
        order_candidates(ids, itc, [1.0], k=3, rerank_k=3)


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
