"""Cross-request micro-batching: concurrent queries share one model call.

A :class:`MicroBatcher` owns one worker thread. Requests ``submit`` items (from any thread, or ``await
batcher(item)`` from the event loop); the worker takes the oldest item, then keeps collecting until the batch
holds ``max_cost`` units (items, or ITM pairs) or ``max_wait_ms`` has passed since it took the first one, and
runs ``fn(items) -> results`` once for all of them. Inference therefore never runs on the event loop, and
ONNX Runtime (which releases the GIL) gets whole batches.

The queue is bounded: ``submit`` raises :class:`~albef.service.domain_errors.Overloaded` when ``queue_max``
items are already waiting, so overload turns into quick 503s instead of unbounded memory and latency. ``max_cost=1`` turns batching off
(one item per call, still off the event loop and still bounded). ``wait_if(n)``, when given, is asked before
a batch of ``n`` items waits for more: False runs it at once (the caller knows nobody else is coming, e.g. a
lone query), so the wait costs latency only when it can buy a bigger batch. ``run_here(item)`` runs one item
in the calling thread instead (a lone search already in a worker thread: no hand-over to the worker and
back); it and the worker never run ``fn`` at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from albef.service.domain_errors import Overloaded

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["MicroBatcher"]


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_cost: int = 16,
        max_wait_ms: float = 2.0,
        queue_max: int = 64,
        cost: Callable[[T], int] | None = None,
        retry_after_s: int = 1,
        on_batch: Callable[[str, int, float], None] | None = None,
        wait_if: Callable[[int], bool] | None = None,
    ) -> None:
        if max_cost < 1 or queue_max < 1:
            raise ValueError("max_cost and queue_max must be at least 1")
        self.name = name
        self.fn = fn
        self.max_cost = int(max_cost)
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.queue_max = int(queue_max)
        self.retry_after_s = retry_after_s
        self._cost = cost or (lambda _item: 1)
        self._on_batch = on_batch
        self._wait_if = wait_if
        self._queue: deque[tuple[T, Future[R]]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        # Held while fn runs, by the worker or by run_here: one model call of this stage at a time.
        self._busy = threading.Lock()
        self.batches = 0  # calls of fn so far
        self.items = 0  # items served so far
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken into a batch)."""
        return len(self._queue)

    def submit(self, item: T) -> Future[R]:
        fut: Future[R] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            if len(self._queue) >= self.queue_max:
                raise Overloaded(self.name, self.retry_after_s)
            self._queue.append((item, fut))
            self._cv.notify()
        return fut

    async def __call__(self, item: T) -> R:
        return await asyncio.wrap_future(self.submit(item))

    def run_here(self, item: T) -> R:
        """Run one item now, in the calling thread, as a batch of its own: for a caller that is already off
        the event loop and knows nobody could join the batch (it skips the hand-over to the worker and back).
        It waits while the worker runs a batch; errors are raised here."""
        with self._busy:
            (result,), _ = self._execute([item])
        return result

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the items already queued are served."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- worker -----------------------------------------------------------------------------------------
    def _take_batch(self) -> list[tuple[T, Future[R]]] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            batch = [first]
            total = self._cost(first[0])
            deadline = time.monotonic() + self.max_wait_s
            while total < self.max_cost:
                if self._queue:
                    nxt_cost = self._cost(self._queue[0][0])
                    if total + nxt_cost > self.max_cost:
                        break
                    batch.append(self._queue.popleft())
                    total += nxt_cost
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                if self._wait_if is not None and not self._wait_if(len(batch)):
                    break  # nothing else could join: run now rather than wait out max_wait_ms
                self._cv.wait(remaining)
            return batch

    def _execute(self, items: list[T]) -> tuple[Sequence[R], float]:
        """``fn`` over one batch and its seconds, with the counters and the metrics hook (the caller holds
        ``_busy``)."""
        t0 = time.perf_counter()
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"batch fn of {self.name} returned {len(results)} results for {len(items)}"
                )
        finally:
            seconds = time.perf_counter() - t0
            self.batches += 1
            self.items += len(items)
            if self._on_batch is not None:
                try:
                    self._on_batch(self.name, len(items), seconds)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    log.exception("batch metrics hook failed")
        return results, seconds

    def _loop(self) -> None:
        while True:
            with self._cv:  # wait for work before taking the model: run_here may hold it meanwhile
                while not self._queue and not self._closed:
                    self._cv.wait()
            with self._busy:
                batch = self._take_batch()
                if batch is None:
                    return
                # A future cancelled by its waiter (client gone) is dropped before it costs model time.
                live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
                if not live:
                    continue
                try:
                    results, seconds = self._execute([item for item, _ in live])
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter, the worker keeps running
                    for _, fut in live:
                        fut.set_exception(exc)
                else:
                    for (_, fut), res in zip(live, results, strict=True):
                        fut.batch_seconds = seconds  # type: ignore[attr-defined]  # the whole batch's fn time
                        fut.set_result(res)
