"""Retrieve, then re-rank: the search logic of the service, independent of HTTP.

One search (either direction) is three stages:

1. **encode** the query: a text (tokenizer + text encoder), an image (safe decode + preprocess + image
   encoder), or an indexed item (its stored ITC vector and stored token features; nothing is re-encoded);
2. **ann**: FAISS search of the other modality's index for the top ``max(k, rerank_k)`` by ITC score
   (``k`` without re-ranking), in ITC order: score descending, then id ascending. With a filter
   (:mod:`albef.index.filters`, parsed by the route) the index reader returns the top of the matching items
   only (:meth:`albef.index.reader.IndexReader.search_filtered`), so every candidate, re-ranked or not,
   matches. ``min_itc_score`` then drops the candidates below it (a tail in ITC order) before re-ranking;
3. **rerank** (if asked): the first ``rerank_k`` candidates go through the ITM head with the query and are
   ordered by the ITM logit of class 1 (the official ALBEF rule, docs/model.md §4.3: ITC is not added), ties by id
   ascending. When ``k > rerank_k``, the results after the re-ranked ones are the next ITC candidates in ITC
   order (they have no ITM score). That ordering is :mod:`albef.model.ranking`, shared with the evaluation.
   Text->image scores (text, candidate image) pairs; image->text computes the query image's cross-attention
   K/V once and scores every candidate text against them (exact). ``min_match_probability`` (re-ranking
   only) then keeps the re-ranked candidates whose match probability is at least that; the candidates
   after the re-ranked head have none and are dropped too. The result counts what each threshold cut.

A query text is cleaned here, once (:func:`clean_query_text`), and tokenized as cleaned. Every admitted search
runs its steps in its own thread (:class:`_Steps`), so the event loop only starts it and takes its result:
model calls go through :class:`Stages` (micro-batched with other searches' calls, see
:mod:`albef.service.batching`) and the thread waits for them; a search admitted while no other is in flight
runs its model calls in its own thread too (nobody could share its batches). Failures
are :mod:`albef.service.domain_errors`; the HTTP layer gives them their status codes. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from albef.index.filters import Filter
from albef.model.ranking import itc_order, order_candidates
from albef.model.text import pre_caption
from albef.service.batching import MicroBatcher
from albef.service.domain_errors import BadQuery, NotFound, Overloaded, WrongItemKind
from albef.service.images import UploadPolicy, decode_upload
from albef.service.metrics import Metrics, StageTimer
from albef.service.protocols import IndexView, Kind, ModelBundle

__all__ = ["Stages", "SearchEngine", "SearchRequest", "SearchResult", "clean_query_text", "match_probability"]

Direction = Literal["t2i", "i2t"]  # t2i: text query -> images; i2t: image query -> texts
_KINDS: dict[str, tuple[Kind, Kind]] = {"t2i": ("text", "image"), "i2t": ("image", "text")}  # (query, target)


def match_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax of the two ITM logits, class 1 (computed in float64: no overflow for large logits)."""
    lg = np.asarray(logits, dtype=np.float64).reshape(-1, 2)
    return 1.0 / (1.0 + np.exp(np.clip(lg[:, 0] - lg[:, 1], -700, 700)))


def clean_query_text(text: str) -> str:
    """A query text cleaned as the model's captions are (the official ``pre_caption``), or :class:`BadQuery`
    if no word is left. The only place a query text is cleaned: it is tokenized as it comes out."""
    cleaned = pre_caption(text)
    if not cleaned.strip():
        # Blank or punctuation-only text tokenizes to [CLS] alone: any "results" would be meaningless.
        raise BadQuery("empty_text", "text: has no words (only white space or punctuation)", field="text")
    return cleaned


class Stages:
    """The model calls of a search, each behind its own micro-batcher (one worker thread each)."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        batch_max_size: int = 16,
        batch_max_wait_ms: float = 2.0,
        itm_max_pairs: int = 256,
        queue_max: int = 64,
        retry_after_s: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        self.bundle = bundle
        self.metrics = metrics
        self.itm_max_pairs = int(itm_max_pairs)
        # How many searches are in flight (set by the engine): an encoder batch waits for company only when
        # some other search could bring it; a lone query is not held up for batch_max_wait_ms.
        self.in_flight: Callable[[], int] | None = None
        on_batch = metrics.on_batch if metrics is not None else None
        common = {"queue_max": queue_max, "retry_after_s": retry_after_s, "on_batch": on_batch}
        encoders = {"max_cost": batch_max_size, "max_wait_ms": batch_max_wait_ms, "wait_if": self._others}
        self.text = MicroBatcher("encode_text", self._encode_texts, **encoders, **common)
        self.image = MicroBatcher("encode_image", self._encode_images, **encoders, **common)
        # ITM jobs weigh their number of pairs; with batching off (size 1) each job runs alone. They are run
        # one call each (see _itm_jobs), so a batch never waits for more: it takes what is queued.
        self.itm = MicroBatcher(
            "rerank",
            self._itm_jobs,
            max_cost=itm_max_pairs if batch_max_size > 1 else 1,
            max_wait_ms=0.0,
            cost=lambda job: len(job[2]),
            **common,
        )
        self.batchers = (self.text, self.image, self.itm)
        if metrics is not None:
            for b in self.batchers:
                metrics.watch_queue(b.name, lambda b=b: b.depth)

    def close(self) -> None:
        for b in self.batchers:
            b.close()

    def _others(self, batch: int) -> bool:
        """Whether a batch of ``batch`` items may get company: more searches are in flight than it holds."""
        return self.in_flight is None or self.in_flight() > batch

    def submit(self, batcher: MicroBatcher, item: Any) -> Future[Any]:
        """One item into a stage's batcher queue (:class:`Overloaded`, counted, when the queue is full)."""
        try:
            return batcher.submit(item)
        except Overloaded:
            if self.metrics is not None:
                self.metrics.rejections.labels(stage=batcher.name).inc()
            raise

    @staticmethod
    def _model_ms(fut: Future[Any], timings: dict[str, float] | None) -> None:
        if timings is not None:  # gains the batch's model time
            timings["model"] = timings.get("model", 0.0) + getattr(fut, "batch_seconds", 0.0) * 1000.0

    async def _call(self, batcher: MicroBatcher, item: Any, timings: dict[str, float] | None = None) -> Any:
        """One item through a stage's batcher, awaited; ``timings["model"]`` (ms) gains its batch's time."""
        fut = self.submit(batcher, item)
        out = await asyncio.wrap_future(fut)
        self._model_ms(fut, timings)
        return out

    def run_here(self, batcher: MicroBatcher, item: Any, timings: dict[str, float] | None = None) -> Any:
        """One item through a stage's batch function in the calling thread (see :class:`_Steps`)."""
        t0 = time.perf_counter()
        out = batcher.run_here(item)
        if timings is not None:
            timings["model"] = timings.get("model", 0.0) + (time.perf_counter() - t0) * 1000.0
        return out

    # -- public (awaitable) -------------------------------------------------------------------------------
    async def encode_text(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One text's ids/mask ``[L]`` -> (embedding ``[D]``, token features ``[L,H]``)."""
        return await self._call(self.text, (ids, mask))

    async def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image's pixels ``[3,R,R]`` -> (embedding ``[D]``, token features ``[N,W]``)."""
        return await self._call(self.image, pixels)

    # -- re-rank jobs of the ``itm`` batcher (logits ``[K, 2]`` each) -----------------------------------------
    @staticmethod
    def t2i_job(text_tokens: np.ndarray, text_mask: np.ndarray, image_tokens: np.ndarray) -> Any:
        """One text ``[L,H]``/``[L]`` against K images ``[K,N,W]``."""
        return ("t2i", (text_tokens, text_mask), image_tokens)

    @staticmethod
    def i2t_job(image_tokens: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray) -> Any:
        """One image ``[N,W]`` against K texts ``[K,L,H]``/``[K,L]`` (its K/V computed once)."""
        return ("i2t", image_tokens, (text_tokens, text_mask))

    # -- batch functions (worker threads) -----------------------------------------------------------------
    def _encode_texts(
        self, items: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        emb, tok = self.bundle.encode_ids(np.stack([i for i, _ in items]), np.stack([m for _, m in items]))
        return [(emb[j], tok[j]) for j in range(len(items))]

    def _encode_images(self, items: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        emb, tok = self.bundle.encode_pixels(np.stack(items))
        return [(emb[j], tok[j]) for j in range(len(items))]

    def _itm_jobs(self, jobs: list[tuple[str, Any, Any]]) -> list[np.ndarray]:
        """Each job is one ONNX Runtime call (or a few of ``itm_max_pairs`` pairs): a text->image job passes
        its one text once for all its images, an image->text job its image's K/V once for all its texts, and
        the runtime trims each call to its longest real text. Jobs of different requests are not
        concatenated: that would repeat the text per pair and pad every text to the longest of all."""
        out: list[np.ndarray] = []
        step = self.itm_max_pairs
        for kind, a, b in jobs:
            if kind == "t2i":
                (tt, tm), images = a, b
                t, m = tt[None], tm[None]
                parts = [
                    self.bundle.itm_scores(t, m, images[i : i + step]) for i in range(0, len(images), step)
                ]
            else:
                image, (tt, tm) = a, b
                kv = self.bundle.image_kv(image[None])
                parts = [
                    self.bundle.itm_scores_for_image(kv, tt[i : i + step], tm[i : i + step])
                    for i in range(0, len(tt), step)
                ]
            out.append(np.concatenate(parts) if parts else np.zeros((0, 2), np.float32))
        return out


@dataclass(frozen=True)
class SearchRequest:
    """One search: exactly one of ``text`` (t2i), ``image`` (i2t, the uploaded bytes) or ``item_id``."""

    direction: Direction
    text: str | None = None
    image: bytes | None = None
    item_id: int | None = None
    k: int = 10
    rerank: bool = True
    rerank_k: int = 32
    exclude: Sequence[int] = ()
    filter: Filter | None = None  # over the target items; candidates are drawn from the matching ones only
    min_itc_score: float | None = None  # candidates with a lower ITC score are dropped before re-ranking
    min_match_probability: float | None = None  # re-ranked results with a lower one are dropped (rerank only)

    @property
    def query_kind(self) -> Kind:
        return _KINDS[self.direction][0]

    @property
    def target(self) -> Kind:
        return _KINDS[self.direction][1]


@dataclass
class SearchResult:
    ids: list[int]
    itc_rank: list[int]  # 1-based position of each result in the ITC order of the candidates
    itc: list[float]
    itm: list[float | None]
    prob: list[float | None]
    timings_ms: dict[str, float] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    candidates: int = 0  # ITC candidates the results were drawn from (after filter and exclude)
    cut: dict[str, int] = field(default_factory=lambda: {"min_itc_score": 0, "min_match_probability": 0})
    filter: dict[str, Any] | None = None  # {"matched": items the filter holds for, "exact": bool}


_Tokens = tuple[np.ndarray, np.ndarray]  # a query text's token ids and mask [L]


@dataclass
class _Query:
    emb: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray | None = None  # text queries only
    echo: dict[str, Any] = field(default_factory=dict)  # what the result says the query was


@dataclass
class _Candidates:
    """The ANN candidates in ITC order: the re-rank head is a prefix, and a position is the ITC rank - 1."""

    ids: list[int]
    itc: list[float]
    fetched: int = 0  # before min_itc_score
    filter: dict[str, Any] | None = None
    features: Any = None  # the re-rank head's image tokens, or (text tokens, mask); None without re-ranking


@contextlib.contextmanager
def _wall_ms(timings: dict[str, float], key: str) -> Iterator[None]:
    """The wall time of a block, in ms, as ``timings[key]`` (it spans the finer stage timers inside)."""
    t0 = time.perf_counter()
    yield
    timings[key] = (time.perf_counter() - t0) * 1000.0


class Abandoned(Exception):  # noqa: N818 - a state, not an error: its search's client has gone
    """A search whose client has gone stops before its next step."""


class _Steps:
    """How one search's steps run: all of them in the search's own thread, one after another, so the
    search's coroutine never suspends and :func:`_run_to_end` drives it to its result. A model call waits in
    its stage's micro-batcher queue (batched with other searches' items) and the thread blocks on it; a lone
    search (``here=True``) runs it through the stage's batch function in its own thread instead (nobody could
    share its batch, and the hand-over would cost more than it saves).

    Why not on the event loop: between its steps a search would need the loop, which under a flood of
    requests is busy answering them; an admitted search then waited for it after every step (docs/cpu.md).
    ``abandon()`` (the client is gone) drops a step still queued in a batcher, and no later step starts."""

    def __init__(self, stages: Stages, *, here: bool) -> None:
        self.stages = stages
        self.here = here
        self.timings: dict[str, float] | None = None  # gains "model": the ms of the search's model calls
        self._lock = threading.Lock()
        self._abandoned = False
        self._queued: Future[Any] | None = None

    async def model(self, batcher: MicroBatcher, item: Any) -> Any:
        if self.here:
            self._check()
            return self.stages.run_here(batcher, item, self.timings)
        with self._lock:
            if self._abandoned:
                raise Abandoned
            fut = self._queued = self.stages.submit(batcher, item)
        try:
            out = fut.result()
        except CancelledError:
            raise Abandoned from None
        finally:
            self._queued = None
        self.stages._model_ms(fut, self.timings)
        return out

    async def blocking(self, fn: Callable[[], Any]) -> Any:
        self._check()
        return fn()

    def _check(self) -> None:
        if self._abandoned:
            raise Abandoned

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._queued is not None:
                self._queued.cancel()  # only while it waits in the queue; a running batch finishes


def _run_to_end(coro: Any) -> Any:
    """The result of a coroutine that never suspends (its steps ran here)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a search step suspended outside the event loop")


class SearchEngine:
    """Searches one index reader with one bundle. ``reader`` is passed per call (hot swaps)."""

    def __init__(
        self,
        bundle: ModelBundle,
        stages: Stages,
        *,
        metrics: Metrics | None = None,
        uploads: UploadPolicy | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.stages = stages
        self.metrics = metrics
        self.uploads = uploads or UploadPolicy()
        # Admission at the door: at most this many searches past it at once. A search holds one item in at most
        # one stage queue at a time, so with no more in flight than a stage queue holds, no stage can refuse
        # one that was admitted: under saturation the 503 comes here, before any decode or model work.
        self.max_in_flight = int(max_in_flight or stages.itm.queue_max)
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._in_flight = 0
        self._here = 0  # of which lone searches running all their steps in one thread (no batcher queues)
        self._admit_lock = threading.Lock()
        if metrics is not None:
            metrics.rejections.labels(stage="search")  # a zero sample from the start, as the other stages
        # company for an encoder batch can only come from searches that use the batchers
        stages.in_flight = lambda: self._in_flight - self._here
        # Uploads are decoded in worker threads before they reach the image encoder's bounded queue; bound the
        # decodes waiting or running too, so that an upload flood is answered with 503 like the other stages
        # instead of queueing without limit in the thread pool.
        img = stages.image
        self._decode_slots = threading.BoundedSemaphore(img.queue_max + img.max_cost)
        # One thread per place: an admitted search never waits for a thread (they are started on demand).
        self._threads = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="search")

    async def search(
        self, reader: IndexView, request: SearchRequest | Direction, /, **fields: Any
    ) -> SearchResult:
        """Encode the query, find the ITC candidates, re-rank the head, rank. ``request`` may also be given as
        a direction with the other :class:`SearchRequest` fields as keywords."""
        if not isinstance(request, SearchRequest):
            request = SearchRequest(request, **fields)
        if request.min_match_probability is not None and not request.rerank:
            raise BadQuery(
                "validation_error",
                "min_match_probability: needs rerank=true (the probability comes from the ITM re-ranking)",
                field="min_match_probability",
            )
        t_start = time.perf_counter()
        # A query text is cleaned and tokenized here, on the event loop (microseconds): a text without words
        # is refused before it takes a place, and the steps start from token ids.
        text = (
            self._tokenize(request.text) if request.item_id is None and request.direction == "t2i" else None
        )
        alone = self._admit()
        steps = _Steps(self.stages, here=alone)

        def run() -> SearchResult:
            try:
                return _run_to_end(self._search(reader, request, text, steps, t_start))
            finally:
                self._leave(here=alone)

        try:
            done = asyncio.get_running_loop().run_in_executor(self._threads, run)
        except BaseException:
            self._leave(here=alone)
            raise
        try:
            return await done
        except asyncio.CancelledError:
            steps.abandon()  # the client is gone: the thread stops before its next step and leaves
            raise

    def close(self) -> None:
        """Let the search threads end (searches in flight finish first)."""
        self._threads.shutdown(wait=False)

    async def _search(
        self, reader: IndexView, request: SearchRequest, text: _Tokens | None, steps: _Steps, t_start: float
    ) -> SearchResult:
        timings: dict[str, float] = {"encode": 0.0, "ann": 0.0, "rerank": 0.0, "model": 0.0}
        steps.timings = timings
        timer = StageTimer(self.metrics, timings)
        with _wall_ms(timings, "encode"):
            q = await self._encode(reader, request, text, steps, timer)
        cands = await self._candidates(reader, request, q, steps, timer)
        logits = await self._rerank(request, q, cands, steps, timer)
        out = _assemble(request, q, cands, logits)
        timings["total"] = (time.perf_counter() - t_start) * 1000.0
        out.timings_ms = {key: round(v, 3) for key, v in timings.items() if not math.isnan(v)}
        return out

    @property
    def in_flight(self) -> int:
        """Searches admitted and not finished."""
        return self._in_flight

    @property
    def full(self) -> bool:
        """Every search place is taken: the door's rule (:meth:`_admit` holds it under the lock)."""
        return self._in_flight >= self.max_in_flight

    def refuse_if_full(self) -> None:
        """Raise :class:`Overloaded` now if every place is taken: a look without the lock, for callers that
        can refuse a search before they have read it (the HTTP layer); :meth:`search` still decides."""
        if self.full:
            raise self._refusal()

    def _refusal(self) -> Overloaded:
        if self.metrics is not None:
            self.metrics.rejections.labels(stage="search").inc()
        return Overloaded("search", self.stages.itm.retry_after_s)

    def _admit(self) -> bool:
        """Let one more search in, or refuse it with :class:`Overloaded` (503 + Retry-After at the edge).
        True when no other search is in flight: this one then runs its model calls in its own thread too."""
        with self._admit_lock:
            refused = self.full
            if not refused:
                self._in_flight += 1
                alone = self._in_flight == 1
                self._here += alone
        if refused:
            raise self._refusal()
        return alone

    def _leave(self, *, here: bool = False) -> None:
        with self._admit_lock:
            self._in_flight -= 1
            self._here -= here

    # -- stage 1: the query -------------------------------------------------------------------------------
    def _tokenize(self, text: str | None) -> _Tokens:
        assert text is not None
        ids, mask = self.bundle.tokenizer([clean_query_text(text)], clean=False)
        return ids[0], mask[0]

    async def _encode(
        self,
        reader: IndexView,
        request: SearchRequest,
        text: _Tokens | None,
        steps: _Steps,
        timer: StageTimer,
    ) -> _Query:
        if request.item_id is not None:
            return await self._item_query(reader, int(request.item_id), request.query_kind, steps)
        if text is not None:
            with timer("encode_text"):
                emb, tok = await steps.model(self.stages.text, text)
            return _Query(emb, tok, text[1], {"kind": "text", "text": request.text})
        assert request.image is not None
        with timer("encode_image"):
            q = await self._image_query(request.image, steps, timer)
        q.echo = {"kind": "image", "bytes": len(request.image)}
        return q

    async def _image_query(self, data: bytes, steps: _Steps, timer: StageTimer) -> _Query:
        def prepare() -> np.ndarray:
            img = decode_upload(data, self.uploads)  # upright already, if the policy says so
            return self.bundle.preprocess([img], exif_transpose=False)[0]

        if not self._decode_slots.acquire(blocking=False):
            if self.metrics is not None:
                self.metrics.rejections.labels(stage="decode").inc()
            raise Overloaded("decode", self.stages.image.retry_after_s)
        try:
            with timer("decode"):
                pixels = await steps.blocking(prepare)
        finally:
            self._decode_slots.release()
        emb, tok = await steps.model(self.stages.image, pixels)
        return _Query(emb, tok)

    async def _item_query(self, reader: IndexView, item_id: int, kind: Kind, steps: _Steps) -> _Query:
        def lookup() -> _Query:
            item = reader.item(item_id)
            if item is None:
                raise NotFound(
                    "item_not_found", f"no item {item_id} in index version {reader.version}", field="item_id"
                )
            if item["kind"] != kind:
                raise WrongItemKind(item_id, item["kind"], kind)
            emb = reader.vector(kind, item_id)
            echo = {"kind": kind, "item_id": item_id}
            if kind == "text":
                tok, mask = reader.text_features([item_id], dtype=None)
                return _Query(emb, tok[0], mask[0], echo)
            return _Query(emb, reader.image_tokens([item_id], dtype=None)[0], None, echo)

        return await steps.blocking(lookup)

    # -- stage 2: the ITC candidates (and the re-rank head's features, in the same worker thread) -----------
    async def _candidates(
        self, reader: IndexView, request: SearchRequest, q: _Query, steps: _Steps, timer: StageTimer
    ) -> _Candidates:
        """The ANN candidates, then (when re-ranking) the stored features of the re-rank head: one blocking
        step for both, the gather straight after the search that names the ids."""
        return await steps.blocking(lambda: self._candidates_now(reader, request, q, timer))

    def _candidates_now(
        self, reader: IndexView, request: SearchRequest, q: _Query, timer: StageTimer
    ) -> _Candidates:
        excluded = {int(i) for i in request.exclude}
        wanted = max(request.k, request.rerank_k) if request.rerank else request.k
        ids: list[int] = []
        itc: list[float] = []
        info: dict[str, Any] | None = None
        if request.filter is not None:
            with _wall_ms(timer.timings, "ann"), timer("ann"):
                hits = reader.search_filtered(request.target, q.emb, wanted, request.filter, sorted(excluded))
            ids, itc = [int(i) for i in hits.ids.tolist()], [float(x) for x in hits.scores.tolist()]
            info = {"matched": int(hits.matched), "exact": bool(hits.exact)}
        else:
            n = min(reader.count(request.target), wanted + len(excluded))
            if n > 0:
                with _wall_ms(timer.timings, "ann"), timer("ann"):
                    scores, found = reader.search(request.target, q.emb[None, :], n)
                for s, i in zip(scores[0].tolist(), found[0].tolist(), strict=True):
                    if i >= 0 and i not in excluded:
                        ids.append(int(i))
                        itc.append(float(s))
        by_itc = itc_order(ids, itc)[:wanted]
        ids, itc = [ids[i] for i in by_itc], [itc[i] for i in by_itc]
        fetched = len(ids)
        if request.min_itc_score is not None:  # a tail in ITC order
            keep = sum(1 for x in itc if x >= request.min_itc_score)
            ids, itc = ids[:keep], itc[:keep]
        cands = _Candidates(ids, itc, fetched, info)
        if request.rerank and ids:
            head = ids[: request.rerank_k]
            with _wall_ms(timer.timings, "features"), timer("features"):
                # as stored (float16): the runtime casts them in ONNX Runtime, far faster than numpy
                cands.features = (
                    reader.image_tokens(head, dtype=None)
                    if request.target == "image"
                    else reader.text_features(head, dtype=None)
                )
        return cands

    # -- stage 3: the ITM re-rank of the head -----------------------------------------------------------------
    async def _rerank(
        self, request: SearchRequest, q: _Query, cands: _Candidates, steps: _Steps, timer: StageTimer
    ) -> np.ndarray | None:
        """The ITM logits ``[H, 2]`` of the first ``rerank_k`` candidates, or None when not re-ranking. The
        ``rerank`` timing spans the head's feature gather (done with the candidates) and the ITM call."""
        if not (request.rerank and cands.ids):
            return None
        feats = cands.features
        with _wall_ms(timer.timings, "rerank"), timer("rerank"):
            if request.direction == "t2i":
                job = self.stages.t2i_job(q.tokens, q.mask, feats)
            else:
                job = self.stages.i2t_job(q.tokens, feats[0], feats[1])
            logits = await steps.model(self.stages.itm, job)
        timer.timings["rerank"] += timer.timings.get("features", 0.0)
        return logits


def _assemble(
    request: SearchRequest, q: _Query, cands: _Candidates, logits: np.ndarray | None
) -> SearchResult:
    """The final top ``k`` (the rule of :mod:`albef.model.ranking`) with the scores of each result; with
    ``min_match_probability``, only re-ranked candidates that reach it."""
    itm = [float(x) for x in logits[:, 1]] if logits is not None else None
    probs = match_probability(logits) if logits is not None else None
    ids, itc = cands.ids, cands.itc
    floor = request.min_match_probability
    order = order_candidates(ids, itc, itm, request.k if floor is None else len(ids), request.rerank_k)
    cut_prob = 0
    if floor is not None:
        passing = [p for p in order if probs is not None and p < len(probs) and probs[p] >= floor]
        cut_prob = len(order) - len(passing)
        order = passing[: request.k]
    return SearchResult(
        ids=[ids[p] for p in order],
        itc_rank=[p + 1 for p in order],
        itc=[itc[p] for p in order],
        itm=[itm[p] if itm is not None and p < len(itm) else None for p in order],
        prob=[float(probs[p]) if probs is not None and p < len(probs) else None for p in order],
        query=q.echo,
        candidates=cands.fetched,
        cut={"min_itc_score": cands.fetched - len(ids), "min_match_probability": cut_prob},
        filter=cands.filter,
    )
