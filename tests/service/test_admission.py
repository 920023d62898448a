"""Admission at the door (issue 15, part 2): under saturation a search is refused with 503 + Retry-After before
it spends any decode or encoder time (over HTTP, before its body is read), and an admitted one is never refused later by a stage queue; a lone
query does not wait out the micro-batching window."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from albef.service.batching import MicroBatcher
from albef.service.domain_errors import NotFound, Overloaded
from albef.service.engine import SearchEngine, SearchRequest, Stages
from albef.service.errors import api_error
from tests.helpers.engine_doubles import FakeBundle
from tests.helpers.service import index_items, live_server, settings


class _GatedBundle(FakeBundle):
    """The bundle double with a text encoder that waits for ``gate``; it counts what it encoded."""

    bundle_id = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.encoded = 0
        self.entered = threading.Semaphore(0)

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.encoded += len(ids)
        for _ in range(len(ids)):
            self.entered.release()
        assert self.gate.wait(20)
        return super().encode_ids(ids, mask)


class _Reader:
    version = "000001"

    def count(self, kind: str) -> int:
        return 3

    def search(self, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[0.9, 0.8, 0.7]], np.float32)[:, :k], np.array([[1, 2, 3]], np.int64)[:, :k]

    def image_tokens(self, ids: list[int], dtype: Any = np.float32) -> np.ndarray:
        out = np.zeros((len(ids), 2, 3), np.float32)
        out[:, 0, 0] = ids
        return out

    def item(self, item_id: int) -> dict[str, Any] | None:
        return None


@contextlib.contextmanager
def _gated_engine(bundle: _GatedBundle, batch_max_size: int) -> Iterator[tuple[Stages, SearchEngine]]:
    """Stages with a wide queue (only the door can refuse) and an engine of 2 places over ``bundle``; on the
    way out the gate opens, so no thread is left waiting, and both close."""
    stages = Stages(bundle, batch_max_size=batch_max_size, batch_max_wait_ms=0, queue_max=50)  # type: ignore[arg-type]
    engine = SearchEngine(bundle, stages, max_in_flight=2)  # type: ignore[arg-type]
    try:
        yield stages, engine
    finally:
        bundle.gate.set()
        stages.close()
        engine.close()


def test_the_door_refuses_beyond_max_in_flight_before_any_encoding() -> None:
    bundle = _GatedBundle()
    reader: Any = _Reader()

    async def scenario(engine: SearchEngine) -> None:
        first = [
            asyncio.create_task(engine.search(reader, "t2i", text=f"a red circle {i}")) for i in range(2)
        ]
        while engine.in_flight < 2:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(bundle.entered.acquire)  # the encoder is busy with an admitted search
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await engine.search(reader, SearchRequest("t2i", text="a blue square"))
        waited = time.perf_counter() - t0
        assert refused.value.stage == "search" and waited < 0.5  # at once, not after the busy encoder
        assert api_error(refused.value).status == 503 and api_error(refused.value).headers == {
            "Retry-After": "1"
        }
        assert bundle.encoded <= 2 and engine.in_flight == 2  # the refused query cost no encoder work
        bundle.gate.set()
        results = await asyncio.gather(*first)
        assert [r.ids for r in results] == [[3, 2, 1], [3, 2, 1]]  # re-ranked by the double's ITM logit
        assert engine.in_flight == 0
        # a search that fails releases its place too; then the door lets searches in again
        with pytest.raises(NotFound):
            await engine.search(reader, "t2i", item_id=7)
        assert engine.in_flight == 0
        assert (await engine.search(reader, "t2i", text="a green triangle")).ids == [3, 2, 1]

    with _gated_engine(bundle, batch_max_size=4) as (_, engine):  # batching on: only the door can refuse
        asyncio.run(scenario(engine))


class _ScoredBundle(_GatedBundle):
    """The gated double that sets ``scored`` once its ITM head has been called ``searches`` times."""

    def __init__(self, searches: int) -> None:
        super().__init__()
        self.searches, self.calls, self.scored = searches, 0, threading.Event()

    def itm_scores(self, *args: Any) -> np.ndarray:
        out = super().itm_scores(*args)
        self.calls += 1  # the rerank stage runs one call at a time
        if self.calls == self.searches:
            self.scored.set()
        return out


def test_admitted_searches_do_not_need_the_event_loop_between_their_steps() -> None:
    # A busy event loop (under a flood it answers refusals) must not hold up the searches it has let in.
    bundle = _ScoredBundle(searches=2)
    reader: Any = _Reader()

    async def scenario(engine: SearchEngine) -> None:
        tasks = [
            asyncio.create_task(engine.search(reader, "t2i", text=f"a red circle {i}")) for i in range(2)
        ]
        while engine.in_flight < 2:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(bundle.entered.acquire)
        bundle.gate.set()
        # The loop is blocked from here (a synchronous wait on it): both searches must go from their encoder
        # through the ANN search to their ITM call without it.
        assert bundle.scored.wait(10)
        results = await asyncio.gather(*tasks)
        assert [r.ids for r in results] == [[3, 2, 1], [3, 2, 1]]
        assert engine.in_flight == 0

    with _gated_engine(bundle, batch_max_size=1) as (_, engine):
        asyncio.run(scenario(engine))


def test_a_search_whose_client_left_drops_its_queued_step_and_leaves() -> None:
    bundle = _GatedBundle()
    reader: Any = _Reader()

    async def scenario(stages: Stages, engine: SearchEngine) -> None:
        first = asyncio.create_task(engine.search(reader, "t2i", text="a red circle"))
        await asyncio.to_thread(bundle.entered.acquire)  # the first holds the encoder
        gone = asyncio.create_task(engine.search(reader, "t2i", text="a blue square"))
        while stages.text.depth < 1:  # the second's encoding waits in the queue
            await asyncio.sleep(0.001)
        gone.cancel()  # its client has gone
        with pytest.raises(asyncio.CancelledError):
            await gone
        bundle.gate.set()
        assert (await first).ids == [3, 2, 1]
        while engine.in_flight:  # the abandoned search's thread leaves its place
            await asyncio.sleep(0.001)
        assert bundle.encoded == 1  # its queued encoding never reached the model

    with _gated_engine(bundle, batch_max_size=1) as (stages, engine):
        asyncio.run(scenario(stages, engine))


def test_max_in_flight_defaults_to_the_stage_queue_bound() -> None:
    bundle = _GatedBundle()
    stages = Stages(bundle, queue_max=5)  # type: ignore[arg-type]
    try:
        assert SearchEngine(bundle, stages).max_in_flight == 5  # type: ignore[arg-type]
        assert SearchEngine(bundle, stages, max_in_flight=9).max_in_flight == 9  # type: ignore[arg-type]
    finally:
        stages.close()


def test_a_lone_item_does_not_wait_out_the_batching_window() -> None:
    def run(wait_if: Any) -> float:
        b = MicroBatcher("t", lambda items: items, max_cost=8, max_wait_ms=400, queue_max=10, wait_if=wait_if)
        try:
            t0 = time.perf_counter()
            assert b.submit(1).result(timeout=10) == 1
            return time.perf_counter() - t0
        finally:
            b.close()

    assert run(lambda n: False) < 0.2  # nobody else is coming: run at once
    assert run(lambda n: True) >= 0.39  # company expected: the window is waited out, as before
    assert run(None) >= 0.39


# -- over HTTP -------------------------------------------------------------------------------------------------
def test_saturated_service_answers_503_at_the_door(service_index: Path) -> None:
    texts = [t["caption"] for t in index_items(service_index)[1][:4]]
    with live_server(settings(service_index, batch_max_size=1, queue_max=2, retry_after_s=3)) as srv:
        engine = srv.state.engine
        batcher = srv.state.stages.text
        gate, entered = threading.Event(), threading.Event()
        real_fn = batcher.fn
        calls = [0]

        def slow_model(items: list[Any]) -> Any:  # the real encoder, made slow: stands for a busy model
            calls[0] += len(items)
            entered.set()
            gate.wait(20)
            return real_fn(items)

        def search(text: str) -> httpx.Response:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                return c.post("/v1/search/images", json={"text": text, "k": 5, "rerank_k": 8})

        batcher.fn = slow_model
        try:
            with ThreadPoolExecutor(2) as pool, srv.client() as c:
                admitted = [pool.submit(search, t) for t in texts[:2]]
                assert entered.wait(20)
                deadline = time.monotonic() + 20
                while engine.in_flight < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                t0 = time.perf_counter()
                r = c.post("/v1/search/images", json={"text": texts[2]})
                assert time.perf_counter() - t0 < 2.0  # not after the busy encoder (it is held for 20 s)
                assert r.status_code == 503 and r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "overloaded"
                upload = c.post("/v1/search/texts", files={"image": ("q.png", _png(), "image/png")})
                assert upload.status_code == 503  # refused before its upload is decoded
                # refused before its body is even parsed: a malformed one gets the 503, not its 422
                bad = c.post(
                    "/v1/search/images", content=b"{not json", headers={"content-type": "application/json"}
                )
                assert bad.status_code == 503 and bad.headers["retry-after"] == "3"
                assert bad.json() == {
                    "error": {"code": "overloaded", "message": r.json()["error"]["message"]}
                }
                m = c.get("/metrics").text
                assert 'albef_queue_rejections_total{stage="search"} 3.0' in m
                assert 'albef_queue_rejections_total{stage="encode_text"} 0.0' in m
                assert calls[0] == 1 and batcher.depth == 1  # one encoding, one admitted search queued
                gate.set()
                assert all(f.result(timeout=30).status_code == 200 for f in admitted)
                bad = c.post(
                    "/v1/search/images", content=b"{not json", headers={"content-type": "application/json"}
                )
                assert bad.status_code == 422  # with places free, the same body reaches validation
            assert engine.in_flight == 0
        finally:
            gate.set()
            batcher.fn = real_fn


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
