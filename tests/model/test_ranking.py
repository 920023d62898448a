"""The one ranking rule (albef.model.ranking): ties by id, the re-ranked head by ITM, the tail in ITC order."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from albef.model.ranking import itc_order, order_candidates, rank


def test_equal_scores_keep_ascending_ids() -> None:
    assert rank(np.array([1.0, 3.0, 3.0, 0.0, 3.0])).tolist() == [1, 2, 4, 0, 3]
    assert rank(np.array([1.0, 3.0, 3.0, 0.0, 3.0]), k=2).tolist() == [1, 2]
    # With explicit ids the tie-break is the id, not the position.
    assert rank([0.5, 0.9, 0.5, 0.9], ids=[7, 3, 9, 5]).tolist() == [1, 3, 0, 2]
    # Rows of a matrix rank independently; a column is its own id.
    m = np.array([[0.0, 2.0, 2.0], [5.0, 5.0, 1.0]], np.float32)
    assert rank(m).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert rank(m, k=1).tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="one list each"):
        rank(m, ids=[0, 1, 2])


def test_dense_and_candidate_forms_agree() -> None:
    """The evaluation ranks score matrices, the service ranks candidate lists: the same order."""
    rng = np.random.default_rng(0)
    row = rng.integers(0, 4, size=40).astype(np.float32)  # many exact ties
    ids = rng.permutation(40)
    candidates = [int(i) for i in ids]
    scores = [float(row[i]) for i in ids]
    assert [candidates[p] for p in itc_order(candidates, scores)] == rank(row).tolist()


def test_itc_order_breaks_ties_by_id() -> None:
    ids = [7, 3, 9, 5]
    itc = [0.5, 0.9, 0.5, 0.9]
    assert [ids[p] for p in order_candidates(ids, itc, None, k=4, rerank_k=2)] == [3, 5, 7, 9]
    assert [ids[p] for p in order_candidates(ids, itc, None, k=2, rerank_k=2)] == [3, 5]
    assert order_candidates([], [], None, k=3, rerank_k=2) == []
    assert order_candidates([], [], [], k=3, rerank_k=2) == []


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


def test_the_tail_keeps_its_itc_order_with_ties_and_shuffled_input() -> None:
    ids = [40, 20, 30, 10, 50]
    itc = [0.1, 0.9, 0.5, 0.5, 0.5]  # ITC order: 20, then 10, 30, 50 tie (by id), then 40
    # head = 20, 10 (ITM scores in that order); tail = 30, 50, 40 in ITC order
    order = [ids[p] for p in order_candidates(ids, itc, [0.0, 0.0], k=5, rerank_k=2)]
    assert order == [10, 20, 30, 50, 40]  # the ITM tie in the head goes to the lower id


def test_the_rule_is_torch_free() -> None:
    code = "import sys, albef.model.ranking; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
