"""The engine without HTTP or a model: the match probability, the query text, the domain errors and their HTTP
status, the stages of a search on doubles, and the public view of items (the ranking rule itself:
tests/model/test_ranking.py)."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from albef.service.domain_errors import (
    BadQuery,
    NotFound,
    Overloaded,
    SearchError,
    TooLarge,
    UnsupportedFormat,
    WrongItemKind,
)
from albef.service.engine import (
    SearchEngine,
    SearchRequest,
    SearchResult,
    Stages,
    clean_query_text,
    match_probability,
)
from albef.service.errors import api_error
from albef.service.routes.items import public_item
from tests.helpers.engine_doubles import FakeBundle


def test_match_probability_is_the_softmax_of_class_one() -> None:
    logits = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, -1.0], [-800.0, 800.0], [800.0, -800.0]], np.float32)
    p = match_probability(logits)
    assert p[0] == pytest.approx(0.5)
    assert p[1] == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3)))
    assert p[2] == pytest.approx(math.exp(-1) / (math.exp(2) + math.exp(-1)))
    assert p[3] == pytest.approx(1.0) and p[4] == pytest.approx(0.0) and np.isfinite(p).all()


def test_public_items_hide_local_paths() -> None:
    local = public_item(
        {"id": 4, "kind": "image", "path": "/data/x.png", "source": "/data/a.json", "sha256": "s"}
    )
    assert local["image_url"] == "/v1/items/4/image" and local["uri"] is None
    assert "/data" not in str(local)
    remote = public_item({"id": 5, "kind": "image", "path": "https://example.org/y.jpg", "sha256": "s"})
    assert remote["uri"] == "https://example.org/y.jpg" and remote["image_url"] is None
    text = public_item(
        {"id": 6, "kind": "text", "path": "/data/x.png", "caption": "a dog", "image_id": 4, "sha256": "s"}
    )
    assert text["image_url"] is None and text["uri"] is None and text["image_id"] == 4


# -- the query text ----------------------------------------------------------------------------------------
def test_query_text_is_cleaned_once_and_a_text_without_words_is_refused() -> None:
    assert clean_query_text("A Red-Circle, above!") == "a red circle above"
    for blank in ("   \t\n ", "?!... ,;"):
        with pytest.raises(BadQuery) as info:
            clean_query_text(blank)
        assert (info.value.code, info.value.field) == ("empty_text", "text")


# -- domain errors -> HTTP ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "status", "headers"),
    [
        (BadQuery("empty_text", "m", field="text"), 422, None),
        (WrongItemKind(3, "image", "text"), 422, None),
        (NotFound("item_not_found", "m", field="item_id"), 404, None),
        (TooLarge("image_too_large", "m", field="image"), 413, None),
        (UnsupportedFormat("unsupported_image_format", "m", field="image"), 415, None),
        (Overloaded("rerank", 4), 503, {"Retry-After": "4"}),
    ],
)
def test_search_errors_get_their_status_at_the_edge(exc: SearchError, status: int, headers: Any) -> None:
    err = api_error(exc)
    assert (err.status, err.code, err.message, err.field, err.headers) == (
        status,
        exc.code,
        exc.message,
        exc.field,
        headers,
    )
    assert Overloaded("rerank").message == "the rerank queue is full; retry later"


# -- the stages of a search, on doubles of the bundle and the index ----------------------------------------
class _Reader:
    """Six images: ids 10..15 with ITC scores ITC and ITM logits ITM; one text, id 20."""

    ITC = {10: 0.9, 11: 0.8, 12: 0.8, 13: 0.6, 14: 0.5, 15: 0.5}
    ITM = {10: 1.0, 11: 3.0, 12: 3.0, 13: 9.0, 14: 0.0, 15: 0.0}
    version = "000001"

    def count(self, kind: str) -> int:
        return len(self.ITC) if kind == "image" else 1

    def search(self, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = sorted(self.ITC, key=lambda i: -self.ITC[i])[:k][::-1]  # any order: the engine sorts
        return np.array([[self.ITC[i] for i in found]], np.float32), np.array([found], np.int64)

    def image_tokens(self, ids: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        out = np.zeros((len(ids), 2, 3), np.float32)
        out[:, 0, 0] = [self.ITM[i] for i in ids]
        return out

    def item(self, item_id: int) -> dict[str, Any] | None:
        return (
            {"id": item_id, "kind": "text" if item_id == 20 else "image"}
            if item_id in (*self.ITC, 20)
            else None
        )


def _search(*, keywords: bool = False, **fields: Any) -> SearchResult:
    bundle = FakeBundle()
    stages = Stages(bundle, batch_max_size=1)  # type: ignore[arg-type]
    try:
        engine = SearchEngine(bundle, stages)  # type: ignore[arg-type]
        reader: Any = _Reader()
        if keywords:
            return asyncio.run(engine.search(reader, "t2i", **fields))
        return asyncio.run(engine.search(reader, SearchRequest("t2i", **fields)))
    finally:
        stages.close()


def test_search_reranks_the_head_and_keeps_the_tail_in_itc_order() -> None:
    res = _search(text="a red circle", k=5, rerank_k=3)
    # head (ITC order 10, 11, 12) by ITM with the tie 11/12 by id; then 13, 14 in ITC order (13's ITM unused)
    assert res.ids == [11, 12, 10, 13, 14]
    assert res.itc_rank == [2, 3, 1, 4, 5]
    assert res.itm == [3.0, 3.0, 1.0, None, None] and res.prob[3:] == [None, None]
    assert res.query == {"kind": "text", "text": "a red circle"}
    assert list(res.timings_ms)[:3] == ["encode", "ann", "rerank"] and "total" in res.timings_ms
    assert 0 < res.timings_ms["model"] <= res.timings_ms["total"]  # the model calls, inside the total
    # without re-ranking: ITC order, ties by id; excluded ids leave the candidates
    plain = _search(text="a red circle", k=4, rerank=False, exclude=[11])
    assert plain.ids == [10, 12, 13, 14] and plain.itm == [None] * 4
    # a direction with keywords is the same request
    assert _search(keywords=True, text="a red circle", k=5, rerank_k=3).ids == res.ids


def test_item_queries_raise_domain_errors() -> None:
    with pytest.raises(NotFound) as nf:
        _search(item_id=99)
    assert (nf.value.code, nf.value.field) == ("item_not_found", "item_id")
    with pytest.raises(WrongItemKind) as wk:
        _search(item_id=12)
    assert (wk.value.item_id, wk.value.kind, wk.value.wanted) == (12, "image", "text")
    with pytest.raises(BadQuery, match="no words"):
        _search(text="?!")


class _ThreadRecordingBundle(FakeBundle):
    """The double, noting the thread of each model call; encoding waits for ``gate`` when it is cleared."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(("encode", threading.current_thread().name))
        assert self.gate.wait(20)
        return super().encode_ids(ids, mask)

    def itm_scores(self, text_tokens: Any, text_mask: Any, image_tokens: Any) -> np.ndarray:
        self.calls.append(("itm", threading.current_thread().name))
        return super().itm_scores(text_tokens, text_mask, image_tokens)


def test_a_lone_search_runs_its_steps_in_one_thread_and_concurrent_ones_share_the_batchers() -> None:
    bundle = _ThreadRecordingBundle()
    stages = Stages(bundle, batch_max_size=8, batch_max_wait_ms=50)  # type: ignore[arg-type]
    engine = SearchEngine(bundle, stages)  # type: ignore[arg-type]
    reader: Any = _Reader()

    async def scenario() -> tuple[list[SearchResult], list[SearchResult]]:
        alone = [await engine.search(reader, "t2i", text="a red circle", k=5, rerank_k=3)]
        lone_calls = list(bundle.calls)
        assert [c for c, _ in lone_calls] == ["encode", "itm"]
        assert lone_calls[0][1] == lone_calls[1][1] and not lone_calls[0][1].startswith("batch-")
        assert stages.text.batches == 1 and stages.itm.batches == 1  # counted as batches of one
        bundle.calls.clear()
        bundle.gate.clear()  # the first search holds the encoder: the others arrive while it is in flight
        first = asyncio.create_task(engine.search(reader, "t2i", text="a red circle", k=5, rerank_k=3))
        while not bundle.calls:
            await asyncio.sleep(0.001)
        rest = [
            asyncio.create_task(engine.search(reader, "t2i", text=f"a red circle {i}", k=5, rerank_k=3))
            for i in range(3)
        ]
        while engine.in_flight < 4:
            await asyncio.sleep(0.001)
        bundle.gate.set()
        return alone, [await first, *await asyncio.gather(*rest)]

    try:
        alone, together = asyncio.run(scenario())
    finally:
        bundle.gate.set()
        stages.close()
    assert all(r.ids == alone[0].ids == [11, 12, 10, 13, 14] for r in together)
    # a batched search counts its batches' model time: the first one held the encoder for all of them
    assert all(0 < r.timings_ms["model"] <= r.timings_ms["total"] for r in [*alone, *together])
    later = [name for call, name in bundle.calls[1:] if call == "encode"]
    assert later and all(name == "batch-encode_text" for name in later)  # the three waited in the batcher
    assert stages.text.items == 5 and stages.text.batches < 5  # and shared a batch
    assert engine.in_flight == 0 and engine._here == 0
