"""Re-scoring of lossy indexes (issue 17, part 4): an IVF-PQ index's candidates are scored exactly from the
stored embeddings before they leave the index, in the FAISS layer, in the build's tuning (the recall the
manifest records), and in the reader's plain and filtered searches; the embeddings stay memory-mapped."""

from __future__ import annotations

import numpy as np
import pytest

from albef.index import ann, builder
from albef.index.builder import BuildOptions
from albef.index.filters import parse_filter
from albef.index.reader import IndexReader
from albef.model.ranking import rank
from tests.helpers.index import make_folder
from tests.index.test_ann import clustered

PQ = "IVF32,PQ8x4"  # 8 sub-quantizers of 4 bits over 32-d: 4 bytes a vector, very lossy


def test_the_lossy_rule() -> None:
    for f in ("IVF4096,PQ128", "IVF64,PQ8x4", "OPQ16,IVF256,PQ16", "IVF256,SQ8", "PQ32", "HNSW32_PQ16"):
        assert ann.lossy(f), f
    for f in ("Flat", "HNSW32", "IVF4096,Flat", "IVF4096_HNSW32,Flat", "IDMap2,Flat", "HNSW16,Flat"):
        assert not ann.lossy(f), f
    assert ann.rescore_factor({"factory": "HNSW32"}) is None
    assert ann.rescore_factor({"factory": "IVF64,PQ8", "rescore": {"factor": 8}}) == 8.0
    # a manifest from before re-scoring: the default factor, still re-scored
    assert ann.rescore_factor({"factory": "IVF64,PQ8"}) == ann.DEFAULT_RESCORE_FACTOR
    assert (
        ann.candidates_for(10, 4) == 40
        and ann.candidates_for(10, 1.25) == 13
        and ann.candidates_for(3, 0.5) == 3
    )


def test_rescoring_raises_recall_and_returns_exact_scores() -> None:
    x = clustered(4000, seed=5)
    q = clustered(4300, seed=5)[4000:]
    ids = (np.arange(4000, dtype=np.int64) * 7)[::-1].copy()  # ids not in row order
    index = ann.build(x, ids, PQ)
    ann.set_params(index, {"nprobe": 8})
    truth = ids[ann.exact_topk(x, q, 10)]
    fetch = ann.fetch_rows(x, ids)
    codes_s, codes_i = ann.search(index, q, 10, tie_margin=0)
    recall_codes = ann.recall_at(codes_i, truth)
    recalls = {}
    for factor in (1, 4, 16):
        s, found = ann.search_rescored(index, q, 10, factor, fetch)
        recalls[factor] = ann.recall_at(found, truth)
        assert (found >= 0).all()
        # the scores are the exact inner products of the stored vectors, in the ranking rule's order
        exact = np.stack([fetch(row) @ qq for row, qq in zip(found, q, strict=True)])
        assert np.allclose(s, exact, atol=1e-6)
        for row_s, row_i in zip(s, found, strict=True):
            assert rank(row_s, row_i).tolist() == list(range(10))
    assert recalls[1] == pytest.approx(recall_codes)  # the same 10 candidates, only re-ordered
    # measured: 0.23 from the codes, 0.68 re-scored from 40 candidates, 1.0 from 160
    assert recall_codes < 0.4 and recalls[4] > recall_codes + 0.3 and recalls[16] >= 0.95
    # the codes' own scores are not exact (what the re-score corrects)
    own = np.stack([fetch(row) @ qq for row, qq in zip(codes_i, q, strict=True)])
    assert np.abs(codes_s - own).max() > 1e-2


def test_rescore_ties_go_to_the_lower_id_and_pads_stay_pads() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    x[4] = x[1]
    x[5] = x[1]  # three equal vectors: equal exact scores
    ids = np.array([50, 40, 30, 20, 10, 60], np.int64)
    fetch = ann.fetch_rows(x, ids)
    q = x[1:2] * 2.0
    cand = np.array([[60, 40, -1, 10, 50, 30]], np.int64)  # as a lossy index may order them; -1: a pad
    s, found = ann.rescore(q, cand, 8, fetch)
    assert found[0, :3].tolist() == [10, 40, 60]  # the tied three, ids ascending
    assert set(found[0, 3:5].tolist()) == {50, 30} and found[0, 5:].tolist() == [-1, -1, -1]
    assert np.isneginf(s[0, 5:]).all() and s[0, 0] == s[0, 1] == s[0, 2]
    with pytest.raises(KeyError, match="ids not held"):
        ann.rescore(q, np.array([[10, 11]]), 2, fetch)


def test_tuning_records_the_rescored_recall_and_the_codes_recall() -> None:
    x = clustered(3000, seed=6)
    q = clustered(3300, seed=6)[3000:]
    ids = np.arange(3000, dtype=np.int64) + 5
    index = ann.build(x, ids, PQ)
    entry = ann.tune(index, PQ, x, ids, queries=q, n_queries=len(q), target_recall=0.9)
    resc = entry["rescore"]
    assert resc["factor"] in ann.RESCORE_FACTORS and resc["candidates"] == 10 * resc["factor"]
    assert resc["vector_bytes"] == 3000 * 32 * 4 and "memory-mapped" in resc["vectors"]
    assert entry["recall_at_k"] >= 0.9 > resc["recall_at_k_codes"]
    # every setting tried says its factor and both recalls; the chosen one is the first reaching the target
    assert all({"rescore_factor", "recall_at_k", "recall_at_k_codes"} <= set(t) for t in entry["tuning"])
    first = next(t for t in entry["tuning"] if t["recall_at_k"] >= 0.9)
    assert (first["params"], first["rescore_factor"]) == (entry["params"], resc["factor"])
    assert entry["tuning"][-1] is first or entry["tuning"][-1] == first
    # what the manifest says is what the re-scored search gives
    _, found = ann.search_rescored(index, q, 10, resc["factor"], ann.fetch_rows(x, ids))
    assert round(ann.recall_at(found, ids[ann.exact_topk(x, q, 10)]), 4) == entry["recall_at_k"]


def test_the_chooser_leaves_the_embeddings_memory_mapped_outside_the_budget() -> None:
    c = ann.choose(1_000_000, 256, "256M")
    assert c.factory == "IVF4096,PQ128" and ann.lossy(c.factory)
    # the budget holds the FAISS index alone; the embeddings (1 GB) are named in the reason, not counted
    assert c.est_bytes == ann.estimate_bytes(c.factory, 1_000_000, 256) <= ann.parse_size("256M")
    assert ann.rescore_bytes(1_000_000, 256) == 1_024_000_000 > ann.parse_size("256M")
    assert "memory-mapped embeddings, 1024000000 bytes" in c.reason
    assert "re-scored" not in ann.choose(1_000_000, 256, "1G").reason  # IVF-Flat: exact vectors


# -- the reader on a real index ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pq_index(index_bundle, tmp_path_factory: pytest.TempPathFactory):
    """A real build with an IVF-PQ factory (200 images, 200 captions), then an add (a second segment) and a
    delete: the reader's re-scoring must find vectors in both segments and never name a deleted item."""
    from albef.index.delete import delete

    root = tmp_path_factory.mktemp("pq")
    idx = root / "index"
    opts = dict(progress=False, workers=2, factory="IVF4,PQ4x4", batch_size=64)
    builder.build(idx, index_bundle, [make_folder(root / "a", 200)], BuildOptions(**opts))
    builder.add(idx, index_bundle, [make_folder(root / "b", 40, seed0=1000)], BuildOptions(**opts))
    delete(idx, [3, 4, 5])
    return idx


def _stored(r: IndexReader, kind: str) -> tuple[np.ndarray, np.ndarray]:
    items = r.items(range(r.manifest["next_id"]))
    ids = np.array([it["id"] for it in items if it["kind"] == kind], np.int64)
    return ids, np.stack([r.vector(kind, int(i)) for i in ids])


def test_reader_search_on_a_pq_index_returns_exact_scores(pq_index) -> None:
    with IndexReader.open(pq_index) as r:
        assert len(r.manifest["segments"]) == 2
        for kind in ("image", "text"):
            entry = r.manifest["ann"][kind]
            assert entry["factory"] == "IVF4,PQ4x4" and entry["rescore"]["factor"] in ann.RESCORE_FACTORS
            assert entry["rescore"]["vector_bytes"] == entry["ntotal"] * r.embed_dim * 4
            assert entry["recall_at_k"] >= entry["rescore"]["recall_at_k_codes"]
        ids, vecs = _stored(r, "image")
        assert not np.isin([3, 4, 5], ids).any()
        _, tvecs = _stored(r, "text")
        q = tvecs[::20]
        s, found = r.search("image", q, 10)
        raw_s, raw_i = ann.search(r._indexes["image"], q, 10)
        assert (found >= 0).all() and not np.isin(found, [3, 4, 5]).any()
        assert found.max() > 200 and found.min() < 200  # both segments
        by_id = dict(zip(ids.tolist(), vecs, strict=True))
        for row_s, row_i, qq in zip(s, found, q, strict=True):
            exact = np.array([by_id[int(i)] @ qq for i in row_i], np.float32)
            assert np.allclose(row_s, exact, atol=1e-6)
            assert rank(row_s, row_i).tolist() == list(range(10))
        # the PQ codes' own scores would not have been exact
        raw_exact = np.array([[by_id[int(i)] @ qq for i in row] for row, qq in zip(raw_i, q, strict=True)])
        assert np.abs(raw_s - raw_exact).max() > 1e-3
        # the stored embeddings stay memory-mapped: re-scoring never loads a whole array
        for name in r.manifest["segments"]:
            assert isinstance(r._segment(name).array("image_emb"), np.memmap)
        got = r._embeddings("image", found[0])
        assert np.array_equal(got, np.stack([by_id[int(i)] for i in found[0]]))
        with pytest.raises(KeyError, match="not image items"):
            r._embeddings("image", [10**9, int(found[0, 0])])


def test_filtered_search_on_a_pq_index_returns_exact_scores(pq_index) -> None:
    """With ``filter_exact_max=0`` every match set goes through the PQ index with an id selector: the
    candidates are approximate (``exact`` False), their scores exact and in the ranking rule's order."""
    flt = parse_filter({"id": {"gte": 100}})
    with IndexReader.open(pq_index, filter_exact_max=0) as r:
        ids, vecs = _stored(r, "image")
        by_id = dict(zip(ids.tolist(), vecs, strict=True))
        _, tvecs = _stored(r, "text")
        for qq in tvecs[::40]:
            hits = r.search_filtered("image", qq, 10, flt, exclude=[150])
            assert not hits.exact and len(hits.ids) == 10
            assert (hits.ids >= 100).all() and 150 not in hits.ids.tolist()
            exact = np.array([by_id[int(i)] @ qq for i in hits.ids], np.float32)
            assert np.allclose(hits.scores, exact, atol=1e-6)
            assert rank(hits.scores, hits.ids).tolist() == list(range(10))
            # and the brute-force path (the default below 50,000 matches) agrees on every score it shares
            with IndexReader.open(pq_index) as exact_r:
                bf = exact_r.search_filtered("image", qq, 10, flt, exclude=[150])
            assert bf.exact
            common = set(bf.ids.tolist()) & set(hits.ids.tolist())
            assert len(common) >= 6
            bf_s = dict(zip(bf.ids.tolist(), bf.scores.tolist(), strict=True))
            for i, sc in zip(hits.ids.tolist(), hits.scores.tolist(), strict=True):
                if i in common:
                    assert abs(bf_s[i] - sc) < 1e-6
