"""The ranking rule of retrieval, written once: the evaluation, the export's evaluator and the service use it.

* Candidates are ordered by score descending, ties by id ascending (:func:`rank`). For a score matrix the id
  of a candidate is its column, so a stable sort of the negated scores is the same rule.
* With re-ranking (:func:`order_candidates`), the first ``rerank_k`` candidates in ITC order are ordered by
  their ITM score (the class-1 logit alone, ITC not added), ties by id ascending; the candidates after them
  keep their ITC order.

The official code's ``np.argsort(score)[::-1]`` puts the higher id first on a tie; only exact ties differ.
NumPy only: the torch-free service imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RANKING", "rank", "itc_order", "order_candidates"]

RANKING = "descending score, stable: ties keep ascending id order"  # recorded in evaluation reports


def rank(
    scores: np.ndarray | Sequence[float], ids: np.ndarray | Sequence[int] | None = None, k: int | None = None
) -> np.ndarray:
    """Positions in ranking order along the last axis (the first ``k`` if given): score descending, ties by
    id ascending. Without ``ids`` (1-D ``scores`` only otherwise) a position is its own id."""
    s = np.asarray(scores)
    if ids is None:
        order = np.argsort(-s, axis=-1, kind="stable")
    else:
        id_arr = np.asarray(ids, dtype=np.int64)
        if s.ndim != 1 or id_arr.shape != s.shape:
            raise ValueError(f"ids {list(id_arr.shape)} and scores {list(s.shape)} must be one list each")
        # Stable sort by id first, so the stable sort by score leaves equal scores in id order.
        by_id = np.argsort(id_arr, kind="stable")
        order = by_id[np.argsort(-s[by_id], kind="stable")]
    return order if k is None else order[..., :k]


def itc_order(ids: Sequence[int], itc: Sequence[float]) -> list[int]:
    """Positions (into ``ids``) in ITC order: score descending, then id ascending."""
    return rank(np.asarray(itc, dtype=np.float64), ids).tolist()


def order_candidates(
    ids: Sequence[int], itc: Sequence[float], itm: Sequence[float] | None, k: int, rerank_k: int
) -> list[int]:
    """Positions (into ``ids``) of the final top ``k``.

    ``ids``/``itc`` are the ANN candidates; ``itm`` holds the class-1 ITM logits of the first
    ``len(itm)`` (= min(rerank_k, len(ids))) of them in ITC order, or is None (no re-rank). Ordering:
    re-ranked head by (ITM desc, id asc), then the rest by (ITC desc, id asc).
    """
    by_itc = np.asarray(itc_order(ids, itc), dtype=np.int64)
    if itm is None:
        return by_itc[:k].tolist()
    head = by_itc[: min(rerank_k, len(by_itc))]
    if len(itm) != len(head):
        raise ValueError(f"{len(itm)} ITM scores for {len(head)} re-ranked candidates")
    head_ids = np.asarray(ids, dtype=np.int64)[head]
    head_sorted = head[rank(np.asarray(itm, dtype=np.float64), head_ids)]
    return np.concatenate([head_sorted, by_itc[len(head) :]])[:k].tolist()
