"""FAISS layer: the chooser under a memory budget, recall measurement, deterministic search, removal."""

from __future__ import annotations

import numpy as np
import pytest

from albef.index import ann
from albef.index.errors import IndexError_


def clustered(n: int, d: int = 32, clusters: int = 50, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    """Normalised vectors around random centres: the structure real embeddings have (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_parse_size() -> None:
    assert ann.parse_size("4G") == 4 * 2**30
    assert ann.parse_size("512m") == 512 * 2**20
    assert ann.parse_size("1.5GB") == int(1.5 * 2**30)
    assert ann.parse_size("1000") == 1000
    with pytest.raises(ValueError, match="bad size"):
        ann.parse_size("four gigs")


def test_chooser_follows_the_memory_budget() -> None:
    assert ann.choose(10_000, 256).factory == "Flat"
    assert ann.choose(100_000, 256, "4G").factory == "HNSW32"
    # 1M x 256 floats are 0.95 GiB: HNSW (plus links) no longer fits 1G, IVF-Flat does.
    assert ann.choose(1_000_000, 256, "1.2G").factory.startswith("HNSW")
    c = ann.choose(1_000_000, 256, "1G")
    assert c.factory == "IVF4096,Flat" and c.est_bytes <= ann.parse_size("1G")
    c = ann.choose(1_000_000, 256, "200M")
    assert c.factory.startswith("IVF4096,PQ") and c.est_bytes <= ann.parse_size("200M")
    smaller = ann.choose(1_000_000, 256, "60M")
    assert int(smaller.factory.split("PQ")[1]) < int(c.factory.split("PQ")[1])
    with pytest.raises(IndexError_, match="do not fit"):
        ann.choose(1_000_000, 256, "1M")


def test_flat_search_is_exact_with_deterministic_ties_and_padding() -> None:
    x = clustered(200, seed=1)
    x[10] = x[3]  # exact duplicates: equal scores, must come out by ascending id
    x[150] = x[3]
    ids = np.arange(1000, 1200, dtype=np.int64)[::-1].copy()  # ids not in row order
    index = ann.build(x, ids, "Flat")
    scores, found = ann.search(index, x[3:4], 5)
    tied = sorted([ids[3], ids[10], ids[150]])
    assert found[0, :3].tolist() == tied
    assert np.allclose(scores[0, :3], 1.0, atol=1e-5)
    exact = ids[np.argsort(-(x @ x[3]), kind="stable")][:5]
    assert set(found[0].tolist()) == set(exact.tolist())
    s, f = ann.search(index, x[:2], 250)
    assert (f[:, 200:] == -1).all() and np.isneginf(s[:, 200:]).all() and (f[:, :200] >= 0).all()
    # without ties or pads FAISS's order is taken as it is: the same as the exact rule
    q = clustered(5, seed=9)
    s, f = ann.search(index, q, 7)
    for row in range(len(q)):
        sc = x @ q[row]
        order = np.lexsort((ids, -sc))[:7]
        assert f[row].tolist() == ids[order].tolist()
        np.testing.assert_allclose(s[row], sc[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF32,Flat", "IVF32,PQ8x4"])
def test_ann_recall_is_measured_and_tuned(factory: str) -> None:
    x = clustered(3000, seed=2)
    q = clustered(3300, seed=2)[3000:]  # same centres, other draws: a nearby query distribution
    ids = np.arange(3000, dtype=np.int64) * 3
    index = ann.build(x, ids, factory)
    entry = ann.tune(index, factory, x, ids, queries=q, n_queries=len(q), target_recall=0.9)
    assert entry["family"] == ann.family(factory)
    assert entry["n_queries"] == 300 and entry["query_source"] == "other-modality"
    assert entry["params"] == next(
        t["params"] for t in entry["tuning"] if t["recall_at_k"] == entry["recall_at_k"]
    )
    # the recall in the manifest entry is what search gives with the chosen parameters (set on the index),
    # re-scored from the stored vectors with the chosen factor where the codes are lossy
    if ann.lossy(factory):
        factor = entry["rescore"]["factor"]
        _, found = ann.search_rescored(index, q, 10, factor, ann.fetch_rows(x, ids))
    else:
        assert entry["rescore"] is None
        _, found = ann.search(index, q, 10, tie_margin=0)
    assert round(ann.recall_at(found, ids[ann.exact_topk(x, q, 10)]), 4) == entry["recall_at_k"]
    # it stopped at the first setting reaching the target, or took the best one
    recalls = [t["recall_at_k"] for t in entry["tuning"]]
    assert entry["recall_at_k"] >= 0.9 or entry["recall_at_k"] == max(recalls)
    assert entry["recall_at_k"] >= (0.2 if "PQ" in factory else 0.85)


def test_remove_keeps_other_ids() -> None:
    x = clustered(3000, seed=3)
    ids = np.arange(3000, dtype=np.int64) + 7
    for factory in ("Flat", "IVF32,Flat"):
        index = ann.build(x, ids, factory)
        assert ann.remove(index, ids[:10]) == 10
        assert index.ntotal == 2990
        ann.set_params(index, {"nprobe": 32} if factory.startswith("IVF") else {})
        _, found = ann.search(index, x[:10], 3)
        assert not np.isin(found, ids[:10]).any()
        _, found = ann.search(index, x[20:21], 1)
        assert found[0, 0] == ids[20]
    assert not ann.supports_remove("HNSW32")


def test_bad_factory_and_too_few_training_vectors() -> None:
    x = clustered(50, seed=4)
    with pytest.raises(IndexError_, match="bad FAISS factory"):
        ann.build(x, np.arange(50), "NotAnIndex")
    with pytest.raises(IndexError_, match="needs at least 256 training vectors"):
        ann.build(x, np.arange(50), "IVF256,Flat")


def test_search_threads_are_the_callers_and_restored_after() -> None:
    """A search runs with the threads it is given (the service passes ALBEF_FAISS_THREADS) and leaves the
    calling thread's OpenMP setting as it found it (it used to reset it to the import-time default)."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors: each is its own nearest neighbour
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    index.add_with_ids(x, np.arange(200, dtype=np.int64))
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(3)
        s1, i1 = ann.search(index, x[:2], 5, threads=2)
        assert faiss.omp_get_max_threads() == 3
        s2, i2 = ann.search(index, x[:2], 5)  # a handful of queries: one thread by default
        assert faiss.omp_get_max_threads() == 3
        s3, i3 = ann.search(index, x[:50], 5)  # a batch: the caller's setting
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(i1, i2) and np.array_equal(i1, i3[:2]) and (i1[:, 0] == [0, 1]).all()


def test_reader_searches_with_the_services_faiss_threads(service_index) -> None:
    from albef.index.reader import IndexReader
    from albef.service.metrics import Metrics
    from albef.service.state import ServiceState
    from tests.helpers.service import settings

    with IndexReader.open(service_index, search_threads=2) as r:
        assert r.search_threads == 2
    state = ServiceState(settings(service_index, faiss_threads=2), Metrics())
    assert state.try_load() and state.reader.search_threads == 2
    state.close()
