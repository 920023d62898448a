"""Micro-batching and back-pressure: the batcher itself, then over HTTP (batched results equal unbatched ones, a
full queue answers 503 with Retry-After, the event loop stays free while inference runs)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from albef.service.batching import MicroBatcher
from albef.service.domain_errors import Overloaded
from albef.service.errors import api_error
from tests.helpers.service import index_items, live_server, settings


# -- the batcher -----------------------------------------------------------------------------------------
def test_batches_form_under_concurrency_and_results_map_back() -> None:
    sizes: list[int] = []

    def fn(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [x * 10 for x in items]

    b = MicroBatcher("t", fn, max_cost=4, max_wait_ms=300, queue_max=100)
    try:
        futures = [b.submit(i) for i in range(10)]
        assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(10)]
    finally:
        b.close()
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) <= 4  # 10 items in batches of at most 4
    assert b.batches == len(sizes) and b.items == 10


def test_cost_limits_a_batch_and_big_items_run_alone() -> None:
    batches: list[list[str]] = []
    b = MicroBatcher(
        "t",
        lambda items: (batches.append(list(items)), items)[1],
        max_cost=7,
        max_wait_ms=300,
        queue_max=100,
        cost=len,
    )
    try:
        futures = [b.submit(s) for s in ("aaa", "bbb", "ccc", "dddddddddd", "e")]
        assert [f.result(timeout=10) for f in futures] == ["aaa", "bbb", "ccc", "dddddddddd", "e"]
    finally:
        b.close()
    assert all(sum(map(len, batch)) <= 7 or len(batch) == 1 for batch in batches)
    assert ["dddddddddd"] in batches


def test_no_batching_with_max_cost_one() -> None:
    sizes: list[int] = []
    b = MicroBatcher(
        "t", lambda items: (sizes.append(len(items)), items)[1], max_cost=1, max_wait_ms=100, queue_max=100
    )
    try:
        assert [f.result(timeout=10) for f in [b.submit(i) for i in range(5)]] == list(range(5))
    finally:
        b.close()
    assert sizes == [1, 1, 1, 1, 1]


def test_bounded_queue_errors_and_cancellation() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        gate.wait(10)
        if 13 in items:
            raise ValueError("unlucky")
        return items

    b = MicroBatcher("t", fn, max_cost=1, max_wait_ms=0, queue_max=2, retry_after_s=7)
    try:
        first = b.submit(1)
        deadline = time.monotonic() + 5
        while b.depth and time.monotonic() < deadline:  # the worker takes the first item and blocks on it
            time.sleep(0.005)
        queued = [b.submit(13), b.submit(3)]
        assert b.depth == 2
        with pytest.raises(Overloaded) as info:
            b.submit(4)
        assert info.value.stage == "t" and info.value.retry_after_s == 7
        # the HTTP layer's view of it: 503 with Retry-After
        assert api_error(info.value).status == 503 and api_error(info.value).headers == {"Retry-After": "7"}
        assert queued[1].cancel()  # a waiter that gave up: its item never reaches the model
        gate.set()
        assert first.result(timeout=10) == 1
        with pytest.raises(ValueError, match="unlucky"):
            queued[0].result(timeout=10)
        assert b.submit(5).result(timeout=10) == 5  # the worker survived the error
    finally:
        gate.set()
        b.close()
    assert [3] not in seen


# -- over HTTP -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(service_index: Path) -> list[str]:
    return [t["caption"] for t in index_items(service_index)[1][:8]]


def _search(url: str, text: str, rerank: bool = True) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/search/images", json={"text": text, "k": 5, "rerank_k": 8, "rerank": rerank})
        assert r.status_code == 200, r.text
        return r.json()


def _batch_counts(metrics_text: str, stage: str) -> tuple[float, float]:
    """(model calls, items) of a stage's batch-size histogram."""
    count = total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f'albef_batch_size_count{{stage="{stage}"}}'):
            count = float(line.split()[-1])
        if line.startswith(f'albef_batch_size_sum{{stage="{stage}"}}'):
            total = float(line.split()[-1])
    return count, total


def test_concurrent_requests_are_batched_and_equal_sequential_answers(
    service_index: Path, texts: list[str]
) -> None:
    with live_server(settings(service_index, batch_max_size=8, batch_max_wait_ms=100)) as srv:
        sequential = [_search(srv.url, t) for t in texts]
        with srv.client() as c:
            calls0, items0 = _batch_counts(c.get("/metrics").text, "encode_text")
        assert (calls0, items0) == (len(texts), len(texts))  # one at a time: batches of 1
        # the first search holds the encoder (a search alone runs its steps in its own thread); the others
        # arrive meanwhile and wait in the batcher, as a burst would
        batcher, gate, entered = srv.state.stages.text, threading.Event(), threading.Event()
        real_fn = batcher.fn

        def held(items: list[Any]) -> Any:
            entered.set()
            assert gate.wait(20)
            return real_fn(items)

        batcher.fn = held
        try:
            with ThreadPoolExecutor(len(texts)) as pool:
                first = pool.submit(_search, srv.url, texts[0])
                assert entered.wait(20)
                rest = [pool.submit(_search, srv.url, t) for t in texts[1:]]
                _wait(lambda: srv.state.engine.in_flight == len(texts))
                gate.set()
                concurrent = [first.result(30), *(f.result(30) for f in rest)]
        finally:
            gate.set()
            batcher.fn = real_fn
        with srv.client() as c:
            m = c.get("/metrics").text
        calls, items = _batch_counts(m, "encode_text")
        assert items - items0 == len(texts) and calls - calls0 < len(texts)  # some requests shared a call
        itm_calls, itm_items = _batch_counts(m, "rerank")
        assert itm_items == 2 * len(texts) and itm_calls < 2 * len(texts)
    for a, b in zip(sequential, concurrent, strict=True):
        assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
        for ha, hb in zip(a["results"], b["results"], strict=True):
            assert hb["itc_score"] == pytest.approx(ha["itc_score"], abs=1e-5)
            assert hb["itm_score"] == pytest.approx(ha["itm_score"], abs=1e-4)


def test_full_queue_answers_503_and_the_loop_stays_free(service_index: Path, texts: list[str]) -> None:
    # Admission at the door is set wider than the stage queue here, so that the stage's own bound is what
    # answers (tests/service/test_admission.py covers the door).
    cfg = settings(service_index, batch_max_size=1, queue_max=2, retry_after_s=3, max_in_flight=100)
    with live_server(cfg) as srv:
        batcher = srv.state.stages.text
        gate, entered = threading.Event(), threading.Event()
        real_fn = batcher.fn

        def slow_model(items: list[Any]) -> Any:  # the real encoder, made slow: stands for a busy model
            entered.set()
            gate.wait(20)
            return real_fn(items)

        batcher.fn = slow_model
        try:
            # No re-ranking: the three requests released at the end must not meet the same tiny queue again at
            # the re-rank stage (on a busy machine they can reach it together).
            with ThreadPoolExecutor(3) as pool, srv.client() as c:
                first = pool.submit(_search, srv.url, texts[0], False)
                assert entered.wait(20)
                queued = [pool.submit(_search, srv.url, t, False) for t in texts[1:3]]
                _wait(lambda: batcher.depth == 2)
                r = c.post("/v1/search/images", json={"text": texts[3]})
                assert r.status_code == 503 and r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "overloaded"
                # inference runs off the event loop: other routes answer while the model is busy
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200 and c.get("/v1/index").status_code == 200
                assert time.perf_counter() - t0 < 5
                m = c.get("/metrics").text
                assert 'albef_queue_depth{stage="encode_text"} 2.0' in m
                assert 'albef_queue_rejections_total{stage="encode_text"} 1.0' in m
                assert 'route="/v1/search/images",status="503"' in m
                gate.set()
                assert all(len(f.result(timeout=30)["results"]) == 5 for f in [first, *queued])
        finally:
            gate.set()
            batcher.fn = real_fn


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_run_here_runs_in_the_calling_thread_and_never_beside_the_worker() -> None:
    threads: list[str] = []
    running = [0]
    overlap = [False]
    gate = threading.Event()

    def fn(items: list[int]) -> list[int]:
        running[0] += 1
        overlap[0] |= running[0] > 1
        threads.append(threading.current_thread().name)
        if items == [1]:
            gate.wait(10)  # the worker holds the model while run_here is called
        running[0] -= 1
        return [x + 100 for x in items]

    seen: list[tuple[str, int, float]] = []
    b = MicroBatcher("t", fn, max_cost=4, max_wait_ms=0, queue_max=10, on_batch=lambda *a: seen.append(a))
    try:
        assert b.run_here(7) == 107 and threads == [threading.current_thread().name]
        queued = b.submit(1)
        deadline = time.monotonic() + 10
        while len(threads) < 2:  # the worker has taken item 1
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with ThreadPoolExecutor(1) as pool:
            here = pool.submit(b.run_here, 2)
            time.sleep(0.05)
            assert not here.done()  # it waits for the worker's batch
            gate.set()
            assert here.result(10) == 102 and queued.result(10) == 101
        assert threads[1] == "batch-t" and threads[2] != "batch-t" and not overlap[0]
        with pytest.raises(RuntimeError, match="returned 0 results"):
            b.fn = lambda items: []
            b.run_here(3)
    finally:
        b.close()
    assert b.batches == 4 and b.items == 4 and [s[1] for s in seen] == [1, 1, 1, 1]
