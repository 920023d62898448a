"""FAISS: choosing an index type under a memory budget, building it, measuring its recall, searching.

The chooser follows autofaiss (criteo/autofaiss ``external/optimize.py``), scaled to this project:

- fewer than ``flat_below`` vectors (default 50,000): ``Flat`` (exact inner product, IndexFlatIP);
- else ``HNSW{M}`` with the largest M in 32, 24, 16, 12, 8 whose graph fits the budget;
- else ``IVF{nlist},Flat`` if the raw vectors fit; nlist is a power of two near 4 sqrt(n);
- else ``IVF{nlist},PQ{m}`` with the largest m (dividing d) whose codes fit.

Ids: Flat and HNSW are wrapped in ``IndexIDMap2``; IVF indexes keep the ids in their inverted lists
(``add_with_ids``/``remove_ids`` natively, no extra map). HNSW cannot remove vectors, so a delete rebuilds
it from the stored embeddings.

Re-scoring, the one rule: an index whose codes are lossy (:func:`lossy`: PQ, SQ, OPQ, PCA, LSH, RQ, ...)
never returns its own approximate scores. :func:`search_rescored` fetches ``ceil(factor * k)`` candidates from
FAISS, scores each exactly against its stored ITC embedding (float32 inner product, the score a Flat index
gives) and returns the top k by the ranking rule (:func:`albef.model.ranking.rank`: score descending, ties by
id ascending). Flat, HNSW-Flat and IVF-Flat hold the float32 vectors already and are returned as searched.
The embeddings are not held by FAISS (no ``IndexRefineFlat`` copy in the index file): the reader memory-maps
the segments' ``<kind>_emb.npy`` files, so re-scoring reads ``ceil(factor * k)`` rows of ``4 * d`` bytes a
query from the page cache (or disk) and the memory budget of :func:`choose` stays the ANN index's own; the
manifest records those bytes (``rescore.vector_bytes``) beside it.

After a build, :func:`tune` measures ANN recall@10 against exact search on a sample of queries (by default
the other modality's embeddings, i.e. real cross-modal queries), picks the smallest ``nprobe``/``efSearch``
that reaches the target recall (for a lossy index: the smallest nprobe, then the smallest re-score factor of
:data:`RESCORE_FACTORS`, with the recall measured after re-scoring), and returns the figures for the manifest.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines about CPU builds are noise
import faiss  # noqa: E402

from albef.index.errors import IndexError_  # noqa: E402
from albef.model.ranking import rank  # noqa: E402

FLAT_BELOW = 50_000
IDMAP_BYTES = 40  # IndexIDMap2: int64 id + reverse hash map entry, per vector (estimate)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)

# Flat search switches to BLAS only from this many queries at once; the faiss default (20) was raised in
# recent wheels to 128000 (see shared docs/environment.md). Batched queries are much faster with BLAS.
faiss.cvar.distance_compute_blas_threshold = 20
# Searches of at most SMALL_QUERY_BATCH queries (service requests) run on one OpenMP thread unless the caller
# says otherwise; larger batches use FAISS's default (all cores).
SMALL_QUERY_BATCH = 8
# The memory budget of each FAISS index when neither the command nor the index's manifest names one.
DEFAULT_MAX_MEMORY = "4G"
# Candidates per result a lossy index is searched for before re-scoring (ceil(factor * k)), cheapest first;
# the build's tuning picks one and records it. DEFAULT_RESCORE_FACTOR: for a manifest that records none.
RESCORE_FACTORS = (1, 2, 4, 8, 16)
DEFAULT_RESCORE_FACTOR = 4
_LOSSY_RE = re.compile(r"(PQ|SQ|LSH|RQ|LSQ|PCA|ITQ|RaBitQ)", re.IGNORECASE)

Fetch = Callable[[np.ndarray], np.ndarray]  # ids int64 [m] -> their stored embeddings float32 [m, d]


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5g', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 4G, 512M, 100000000)")
    mult = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


@dataclass(frozen=True)
class Choice:
    factory: str
    reason: str
    est_bytes: int


def nlist_for(n: int) -> int:
    target = 4 * math.sqrt(max(n, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(target)))))


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Rough resident size of ``factory`` holding n vectors of dimension d."""
    f = factory.replace(" ", "")
    if f == "Flat":
        return n * (4 * d + IDMAP_BYTES)
    m = re.match(r"^HNSW(\d+)", f)
    if m:
        return int(n * (4 * d + 2 * int(m.group(1)) * 4 * 1.05 + IDMAP_BYTES))
    m = re.match(r"^IVF(\d+),Flat$", f)
    if m:
        return n * (4 * d + 8) + int(m.group(1)) * 4 * d
    m = re.match(r"^IVF(\d+),PQ(\d+)(?:x(\d+))?$", f)
    if m:
        nl, pq, bits = int(m.group(1)), int(m.group(2)), int(m.group(3) or 8)
        return n * (pq * bits // 8 + 8) + nl * 4 * d + pq * (2**bits) * (d // pq) * 4
    return n * (4 * d + IDMAP_BYTES)


def choose(
    n: int, d: int, max_memory: int | str = DEFAULT_MAX_MEMORY, flat_below: int = FLAT_BELOW
) -> Choice:
    budget = parse_size(max_memory)
    if n < flat_below and estimate_bytes("Flat", n, d) <= budget:
        return Choice("Flat", f"{n} < {flat_below} vectors: exact search", estimate_bytes("Flat", n, d))
    for m in (32, 24, 16, 12, 8):
        est = estimate_bytes(f"HNSW{m}", n, d)
        if est <= budget:
            return Choice(f"HNSW{m}", f"HNSW graph with M={m} fits {budget} bytes", est)
    nlist = nlist_for(n)
    est = estimate_bytes(f"IVF{nlist},Flat", n, d)
    if est <= budget:
        return Choice(f"IVF{nlist},Flat", "HNSW does not fit; raw vectors in IVF lists do", est)
    for pq in (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4):
        if pq > d or d % pq:
            continue
        f = f"IVF{nlist},PQ{pq}"
        est = estimate_bytes(f, n, d)
        if est <= budget:
            return Choice(
                f,
                f"raw vectors do not fit; PQ codes of {pq} bytes do (results re-scored from the "
                f"memory-mapped embeddings, {rescore_bytes(n, d)} bytes on disk, not counted)",
                est,
            )
    raise IndexError_(f"{n} vectors of dimension {d} do not fit in {budget} bytes even as IVF-PQ4")


def is_ivf(factory: str) -> bool:
    return factory.replace(" ", "").startswith("IVF")


def family(factory: str) -> str:
    f = factory.replace(" ", "")
    if f.startswith("HNSW"):
        return "hnsw"
    if f.startswith("IVF"):
        return "ivf-pq" if ",PQ" in f else "ivf-flat"
    return "flat" if f == "Flat" else "other"


def lossy(factory: str) -> bool:
    """Whether ``factory`` stores compressed codes instead of the float32 vectors (its scores are then
    approximate and :func:`search_rescored` re-scores them). ``IVF4096_HNSW32,Flat`` is exact: only the
    coarse quantizer is a graph."""
    parts = factory.replace(" ", "").split(",")
    return any(_LOSSY_RE.search(p) for p in parts if not re.fullmatch(r"(IDMap2?|IVF\d+(_HNSW\d+)?)", p))


def rescore_bytes(n: int, d: int) -> int:
    """Bytes of the float32 embeddings re-scoring reads from (memory-mapped, outside the FAISS budget)."""
    return int(n) * int(d) * 4


def supports_remove(factory: str) -> bool:
    return family(factory) in ("flat", "ivf-flat", "ivf-pq")


def build(vectors: np.ndarray, ids: np.ndarray, factory: str, *, seed: int = 1234) -> faiss.Index:
    """A trained index of ``factory`` (inner product) holding ``vectors`` under ``ids``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, d = vectors.shape
    try:
        base = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexError_(f"bad FAISS factory string {factory!r}: {str(exc).splitlines()[-1]}") from exc
    if is_ivf(factory) or factory.startswith("IDMap"):
        index = base
    else:
        index = faiss.IndexIDMap2(base)
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if is_ivf(factory) else 0
        if n < max(nlist, 1):
            raise IndexError_(f"{factory!r} needs at least {nlist} training vectors, have {n}")
        if is_ivf(factory):
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            if hasattr(ivf, "do_polysemous_training"):
                # IVF-PQ trains polysemous codes by default: minutes of annealing we never use.
                ivf.do_polysemous_training = False
        rng = np.random.default_rng(seed)
        cap = min(n, max(40 * nlist, 20_000), 163_840)  # faiss asks for >= 39 per list; more costs minutes
        sample = vectors[np.sort(rng.choice(n, cap, replace=False))] if cap < n else vectors
        index.train(sample)
    if n:
        index.add_with_ids(vectors, ids)
    return index


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64)
        )


def remove(index: faiss.Index, ids: np.ndarray) -> int:
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))


def set_params(index: faiss.Index, params: dict[str, Any]) -> None:
    ps = faiss.ParameterSpace()
    for key, value in params.items():
        ps.set_index_parameter(index, key, value)


def write(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    tie_margin: int = 16,
    threads: int | None = None,
    params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores float32 [Q,k], ids int64 [Q,k]); ties ordered by id ascending, pads are (-inf, -1).

    A few more than k are fetched so that items tied with the k-th one are all seen before the cut.
    ``threads``: OpenMP threads for this call (the service passes ``ALBEF_FAISS_THREADS``); None = 1 for a
    handful of queries, FAISS's default for batches. The calling thread's setting is restored afterwards.
    ``params``: FAISS search parameters of this call (a filtered search's id selector)."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq = q.shape[0]
    if k <= 0:
        raise ValueError("k must be positive")
    total = int(index.ntotal)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if total == 0 or nq == 0:
        return out_s, out_i
    kk = min(total, k + tie_margin)
    if threads is None and nq <= SMALL_QUERY_BATCH:
        # OpenMP over a handful of queries costs more than it gains when the cores are busy (measured: a
        # single Flat query 5x slower with 2 threads on 2 loaded cores).
        threads = 1
    if threads is not None:
        before = faiss.omp_get_max_threads()  # the setting is per calling thread: put it back as it was
        faiss.omp_set_num_threads(int(threads))
        try:
            scores, ids = index.search(q, kk, params=params)
        finally:
            faiss.omp_set_num_threads(before)
    else:
        scores, ids = index.search(q, kk, params=params)
    valid = ids >= 0
    if valid.all() and bool((scores[:, 1:] < scores[:, :-1]).all()):
        # no pads and no ties (the usual case): FAISS's order is already the rule's
        m = min(k, scores.shape[1])
        out_s[:, :m] = scores[:, :m]
        out_i[:, :m] = ids[:, :m]
        return out_s, out_i
    s_key = np.where(valid, -scores, np.inf)
    i_key = np.where(valid, ids, np.iinfo(np.int64).max)
    order = np.lexsort((i_key, s_key), axis=-1)[:, :k]
    sel_s = np.take_along_axis(np.where(valid, scores, -np.inf), order, axis=-1)
    sel_i = np.take_along_axis(np.where(valid, ids, -1), order, axis=-1)
    m = sel_s.shape[1]
    out_s[:, :m] = sel_s
    out_i[:, :m] = sel_i
    return out_s, out_i


def candidates_for(k: int, factor: float) -> int:
    """How many candidates a lossy index is searched for to return ``k`` re-scored results."""
    return max(int(k), int(math.ceil(float(factor) * int(k))))


def exact_scores(queries: np.ndarray, candidates: np.ndarray, fetch: Fetch) -> np.ndarray:
    """Exact ITC scores float32 [Q, c] of each query with its candidates (ids [Q, c], -1 = none: -inf): the
    inner product of float32 vectors, each candidate's vector from ``fetch`` (one call for all of them)."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    cand = np.asarray(candidates, dtype=np.int64)
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    valid = cand >= 0
    if not valid.any():
        return out
    uniq, inverse = np.unique(cand[valid], return_inverse=True)
    vecs = np.asarray(fetch(uniq), dtype=np.float32)
    if vecs.shape != (len(uniq), q.shape[1]):
        raise ValueError(f"fetch returned {list(vecs.shape)} for {len(uniq)} ids of dimension {q.shape[1]}")
    where = np.zeros(cand.shape, dtype=np.int64)
    where[valid] = inverse
    for r in range(cand.shape[0]):
        cols = np.flatnonzero(valid[r])
        if len(cols):
            out[r, cols] = (
                vecs[where[r, cols]] @ q[r]
            )  # the brute-force path's expression (albef.index.reader)
    return out


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top ``k`` (scores, ids) by :func:`albef.model.ranking.rank`; ids -1 are left out; pads are
    (-inf, -1)."""
    nq = scores.shape[0]
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for r in range(nq):
        keep = np.flatnonzero(ids[r] >= 0)
        order = keep[rank(scores[r, keep], ids[r, keep], k)]
        out_s[r, : len(order)] = scores[r, order]
        out_i[r, : len(order)] = ids[r, order]
    return out_s, out_i


def rescore(
    queries: np.ndarray, candidates: np.ndarray, k: int, fetch: Fetch
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of ``candidates`` (ids [Q, c]) by exact score (:func:`exact_scores`, :func:`top_k`)."""
    cand = np.asarray(candidates, dtype=np.int64)
    return top_k(exact_scores(queries, cand, fetch), cand, int(k))


def search_rescored(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    factor: float,
    fetch: Fetch,
    threads: int | None = None,
    params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` for ``ceil(factor * k)`` candidates, then :func:`rescore` to the top ``k``: exact
    scores, the ranking rule's order; the same shapes and pads as :func:`search`."""
    _, cand = search(index, queries, candidates_for(k, factor), tie_margin=0, threads=threads, params=params)
    return rescore(queries, cand, k, fetch)


def fetch_rows(vectors: np.ndarray, ids: np.ndarray) -> Fetch:
    """A :data:`Fetch` over in-memory (or memory-mapped) ``vectors`` whose row i holds id ``ids[i]``."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def fetch(want: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_ids, want)
        pos = np.minimum(pos, len(sorted_ids) - 1)
        if len(want) and not np.array_equal(sorted_ids[pos], want):
            raise KeyError(f"ids not held: {np.setdiff1d(want, sorted_ids)[:10].tolist()}")
        rows = order[pos]
        return np.asarray(vectors[rows], dtype=np.float32)

    return fetch


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the exact top-k by inner product (brute force with BLAS)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, rows = flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(vectors)))
    return rows


def recall_at(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    k = true_ids.shape[1]
    hits = sum(
        len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist()))
        for a, b in zip(found_ids, true_ids, strict=True)
    )
    return hits / float(true_ids.shape[0] * k) if k else 1.0


def tune(
    index: faiss.Index,
    factory: str,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    queries: np.ndarray | None = None,
    n_queries: int = 500,
    k: int = 10,
    target_recall: float = 0.95,
    seed: int = 0,
    fetch: Fetch | None = None,
) -> dict[str, Any]:
    """Measure recall@k vs exact search and set the cheapest search parameter (smallest nprobe/efSearch) that
    reaches ``target_recall``, else the one with the best recall. For a lossy index (:func:`lossy`) the recall
    is the re-scored one (:func:`search_rescored`, what the reader returns): for each nprobe, cheapest first,
    the factors of :data:`RESCORE_FACTORS` are tried in turn, and the recall of the codes' own order is
    recorded beside it (``recall_at_k_codes``). ``fetch``: the stored embeddings by id (default: ``vectors``
    themselves). Latency per single query is recorded for every setting tried but does not steer the choice:
    on shared CPUs it is too noisy. Returns the manifest entry."""
    n = len(ids)
    rng = np.random.default_rng(seed)
    is_lossy = lossy(factory)
    out: dict[str, Any] = {"factory": factory, "family": family(factory), "ntotal": int(index.ntotal), "k": k}
    if n == 0:
        out.update(params={}, recall_at_k=None, query_ms=None, tuning=[], rescore=None)
        return out
    if queries is None or len(queries) == 0:
        queries, qsource = vectors, "own"
    else:
        qsource = "other-modality"
    nq = min(n_queries, len(queries))
    q = np.ascontiguousarray(queries[np.sort(rng.choice(len(queries), nq, replace=False))], dtype=np.float32)
    kk = min(k, n)
    true = ids[exact_topk(vectors, q, kk)]
    out.update(n_queries=nq, query_source=qsource)
    fam = family(factory)
    if fam == "ivf-flat" or fam == "ivf-pq":
        nlist = faiss.extract_index_ivf(index).nlist
        grid = [("nprobe", p) for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist]
    elif fam == "hnsw":
        grid = [("efSearch", e) for e in (16, 32, 64, 128, 256, 512)]
    else:
        grid = [(None, None)]
    if is_lossy and fetch is None:
        fetch = fetch_rows(vectors, ids)
    factors: tuple[int | None, ...] = RESCORE_FACTORS if is_lossy else (None,)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    done = False
    for name, value in grid:  # cheapest first
        params = {name: value} if name else {}
        set_params(index, params)
        if not is_lossy:
            _, found = search(index, q, kk, tie_margin=0)
            results = [(None, recall_at(found, true), None)]
        else:
            assert fetch is not None
            # One search for the most candidates; a smaller factor's candidates are its prefix.
            _, cand = search(index, q, candidates_for(kk, factors[-1]), tie_margin=0)
            codes = recall_at(cand[:, :kk], true)
            exact = exact_scores(q, cand, fetch)
            results = []
            for f in factors:
                c = candidates_for(kk, f)  # type: ignore[arg-type]
                _, found = top_k(exact[:, :c], cand[:, :c], kk)
                results.append((f, recall_at(found, true), codes))
        for f, rec, codes in results:
            entry: dict[str, Any] = {"params": params}
            if f is not None:
                entry["rescore_factor"] = f
            entry["recall_at_k"] = round(rec, 4)
            if codes is not None:
                entry["recall_at_k_codes"] = round(codes, 4)
            entry["query_ms"] = round(_latency_ms(index, q[: min(30, nq)], kk, f, fetch), 3)
            tried.append(entry)
            if chosen is None or rec > chosen["recall_at_k"]:
                chosen = entry
            if rec >= target_recall:
                done = True
                break
        if done:
            break
    assert chosen is not None
    set_params(index, chosen["params"])
    out.update(
        params=chosen["params"],
        recall_at_k=chosen["recall_at_k"],
        query_ms=chosen["query_ms"],
        target_recall=target_recall,
        tuning=tried,
        rescore=(
            {
                "factor": chosen["rescore_factor"],
                "candidates": candidates_for(k, chosen["rescore_factor"]),
                "recall_at_k_codes": chosen["recall_at_k_codes"],
                "vectors": "segments/*/<kind>_emb.npy, float32, memory-mapped",
                "vector_bytes": rescore_bytes(n, vectors.shape[1]),
            }
            if is_lossy
            else None
        ),
    )
    return out


def rescore_factor(entry: dict[str, Any] | None) -> float | None:
    """The re-score factor a manifest entry's index is searched with: the tuned one, the default for a lossy
    index whose manifest predates re-scoring, None for an exact index."""
    if not entry or not entry.get("factory") or not lossy(entry["factory"]):
        return None
    return float((entry.get("rescore") or {}).get("factor") or DEFAULT_RESCORE_FACTOR)


def _latency_ms(
    index: faiss.Index, q: np.ndarray, k: int, factor: float | None = None, fetch: Fetch | None = None
) -> float:
    t0 = time.perf_counter()
    for row in q:
        if factor is not None and fetch is not None:
            search_rescored(index, row[None, :], k, factor, fetch)
        else:
            index.search(row[None, :], k)
    return (time.perf_counter() - t0) * 1000.0 / max(len(q), 1)
