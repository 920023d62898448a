"""Agreement: for the same model and data the service ranks exactly as offline scoring with the runtime and as
the official evaluation (``albef.model.train.evaluate``), with and without re-ranking, in both directions.

Setup: the synthetic test split (40 images, ~160 captions) in an exact (Flat) index; k = rerank_k = k_test.

- Content queries (a caption as text, an image file as upload) against offline scoring with the ONNX runtime
  on the same stored features: identical id lists.
- Queries by indexed item (stored vector and stored token features) against ``score_matrices`` (the official
  evaluation, torch) fed with the same stored features: identical id lists up to float rounding between torch
  and ONNX Runtime (a swap is accepted only between candidates whose eval scores differ by < 1e-5).
- Content queries against ``albef eval`` proper (``compute_features`` from the files, float32 features): the
  index stores token features in fp16, so a swap is accepted between candidates whose eval scores differ by
  less than the fp16 rounding effect (2e-3 on the ITM logit); everything else must be identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.service import ModelSetup, index_items, live_server, settings

K = 16  # k = rerank_k = k_test


@pytest.fixture(scope="module")
def setup(agreement_setup: ModelSetup) -> ModelSetup:
    print(
        f"agreement model: {'trained ' + str(agreement_setup.checkpoint) if agreement_setup.trained else 'random'}"
    )
    return agreement_setup


@pytest.fixture(scope="module")
def client(setup: ModelSetup):
    with live_server(settings(setup.index, max_rerank_k=64)) as srv, srv.client() as c:
        yield c


@pytest.fixture(scope="module")
def data(setup: ModelSetup) -> dict[str, Any]:
    images, texts = index_items(setup.index)
    return {
        "images": images,
        "texts": texts,
        "image_ids": [it["id"] for it in images],
        "text_ids": [it["id"] for it in texts],
    }


def check_ranking(got: list[int], ref_order: list[int], ref_score: dict[int, float], tol: float) -> bool:
    """True if ``got`` equals the reference's top; else it must differ only by swaps of near-tied items
    (reference scores within ``tol``), or an AssertionError is raised. Returns whether it was exact."""
    n = len(got)
    if got == ref_order[:n]:
        return True
    scores = [ref_score[i] for i in got]
    for i in range(n):
        assert max(scores[i:]) <= scores[i] + tol, (got, ref_order[:n], scores)
    kth = ref_score[ref_order[n - 1]]
    assert all(ref_score[i] >= kth - tol for i in got), (got, ref_order[:n])
    return False


OFF_EVERY = 4  # rerank=false is also asked for every 4th query (the re-ranked answers hold the ITC top k too)


def service_rank(client: httpx.Client, route: str, rerank: bool, **query: Any) -> list[int]:
    kw: dict[str, Any] = {"k": K, "rerank": rerank, "rerank_k": K}
    if "upload" in query:
        r = client.post(
            route,
            files={"image": ("q.png", query["upload"], "image/png")},
            data={key: str(v).lower() for key, v in kw.items()},
        )
    else:
        r = client.post(route, json={**query, **kw})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    return [h["id"] for h in hits]


@pytest.fixture(scope="module")
def answers(client: httpx.Client, data: dict[str, Any]) -> dict[str, dict[str, list[list[int] | None]]]:
    """The service's rankings of every test query, asked once: ``answers[mode][name][query]`` with mode
    "content" (caption text / image upload) or "item" (item_id), name t2i_itm, t2i_itc, i2t_itm, i2t_itc
    (None where rerank=false was not asked)."""
    out: dict[str, dict[str, list]] = {
        m: {n: [] for n in ("t2i_itm", "t2i_itc", "i2t_itm", "i2t_itc")} for m in ("content", "item")
    }
    for j, text in enumerate(data["texts"]):
        for mode, q in (("content", {"text": text["caption"]}), ("item", {"item_id": text["id"]})):
            out[mode]["t2i_itm"].append(service_rank(client, "/v1/search/images", True, **q))
            off = service_rank(client, "/v1/search/images", False, **q) if j % OFF_EVERY == 0 else None
            out[mode]["t2i_itc"].append(off)
    for i, image in enumerate(data["images"]):
        upload = Path(image["path"]).read_bytes()
        for mode, q in (("content", {"upload": upload}), ("item", {"item_id": image["id"]})):
            out[mode]["i2t_itm"].append(service_rank(client, "/v1/search/texts", True, **q))
            off = service_rank(client, "/v1/search/texts", False, **q) if i % OFF_EVERY == 0 else None
            out[mode]["i2t_itc"].append(off)
    return out


def test_service_equals_offline_runtime_scoring(
    answers: dict[str, Any], data: dict[str, Any], setup: ModelSetup
) -> None:
    from albef.index import IndexReader
    from albef.model.runtime import Bundle

    bundle = Bundle.load(setup.bundle, intra_op_threads=1)
    got = answers["content"]
    with IndexReader.open(setup.index) as reader:
        img_vecs = np.stack([reader.vector("image", i) for i in data["image_ids"]])
        txt_vecs = np.stack([reader.vector("text", i) for i in data["text_ids"]])

        def offline(q_emb: np.ndarray, vecs: np.ndarray, ids: list[int], rescore: Any) -> tuple[list, list]:
            sims = vecs @ q_emb
            itc = sorted(range(len(ids)), key=lambda j: (-sims[j], ids[j]))
            cand = [ids[j] for j in itc[:K]]
            logits = rescore(cand)[:, 1]
            return cand, [cand[j] for j in sorted(range(len(cand)), key=lambda j: (-logits[j], cand[j]))]

        emb, tok, mask = bundle.encode_texts([t["caption"] for t in data["texts"]], batch_size=1)
        for j in range(len(data["texts"])):

            def t2i(cand: list[int], j: int = j) -> np.ndarray:
                return bundle.itm_scores(
                    np.repeat(tok[j : j + 1], len(cand), 0),
                    np.repeat(mask[j : j + 1], len(cand), 0),
                    reader.image_tokens(cand),
                )

            itc_ids, itm_ids = offline(emb[j], img_vecs, data["image_ids"], t2i)
            assert got["t2i_itm"][j] == itm_ids
            assert got["t2i_itc"][j] in (None, itc_ids)

        for i, image in enumerate(data["images"]):
            emb, tok = bundle.encode_images([image["path"]])

            def i2t(cand: list[int], tok: np.ndarray = tok) -> np.ndarray:
                tt, tm = reader.text_features(cand)
                return bundle.itm_scores_for_image(tok, tt, tm)

            itc_ids, itm_ids = offline(emb[0], txt_vecs, data["text_ids"], i2t)
            assert got["i2t_itm"][i] == itm_ids
            assert got["i2t_itc"][i] in (None, itc_ids)
    assert sum(x is not None for x in got["t2i_itc"]) >= len(data["texts"]) // OFF_EVERY


@pytest.fixture(scope="module")
def torch_model(setup: ModelSetup):
    import torch

    from albef.model.factory import create_model

    # One thread: on a shared 2-core machine OpenMP's spinning threads made the eval 6x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield create_model(None, setup.checkpoint)
    finally:
        torch.set_num_threads(threads)


def _eval_rankings(scores: Any, data: dict[str, Any]) -> dict[str, list[tuple[list[int], dict[int, float]]]]:
    """Per query: (reference order as item ids, reference score per item id), for the four rankings."""
    from albef.model.ranking import rank

    img_ids, txt_ids = np.array(data["image_ids"]), np.array(data["text_ids"])

    def rows(matrix: np.ndarray, cols: np.ndarray) -> list[tuple[list[int], dict[int, float]]]:
        return [
            ([int(c) for c in cols[rank(row)]], dict(zip(cols.tolist(), row.tolist(), strict=True)))
            for row in matrix
        ]

    return {
        "t2i_itm": rows(scores.t2i, img_ids),
        "t2i_itc": rows(scores.sims.T, img_ids),
        "i2t_itm": rows(scores.i2t, txt_ids),
        "i2t_itc": rows(scores.sims, txt_ids),
    }


def _compare_all(got: dict[str, list], ref: dict[str, Any], tol: float) -> dict[str, int]:
    """Compare every answer with the reference; returns how many were exactly equal per ranking."""
    exact = {name: 0 for name in ref}
    for name, rows in ref.items():
        assert len(got[name]) == len(rows)
        for answer, (order, score) in zip(got[name], rows, strict=True):
            if answer is not None:
                exact[name] += check_ranking(answer, order, score, tol)
    return exact


def test_service_equals_eval_on_the_same_features(
    answers: dict[str, Any], data: dict[str, Any], torch_model: Any, setup: ModelSetup
) -> None:
    import torch

    from albef.index import IndexReader
    from albef.model.train.evaluate import score_matrices

    with IndexReader.open(setup.index) as reader:
        tt, tm = reader.text_features(data["text_ids"])
        feats = {
            "image_emb": torch.from_numpy(np.stack([reader.vector("image", i) for i in data["image_ids"]])),
            "image_tokens": torch.from_numpy(reader.image_tokens(data["image_ids"])),
            "text_emb": torch.from_numpy(np.stack([reader.vector("text", i) for i in data["text_ids"]])),
            "text_tokens": torch.from_numpy(tt),
            "text_mask": torch.from_numpy(tm),
        }
    scores = score_matrices(torch_model, feats, k_test=K, progress=False)
    got = answers["item"]
    exact = _compare_all(got, _eval_rankings(scores, data), tol=1e-5)
    asked = {name: sum(a is not None for a in rows) for name, rows in got.items()}
    print(f"exact rankings vs eval on the index features: {exact} of {asked}")
    # Measured: every ranking identical (torch and ONNX Runtime agree to ~1e-6 here); the tolerance only keeps
    # the test robust to a future exact near-tie.
    assert exact["t2i_itc"] == asked["t2i_itc"] and exact["i2t_itc"] == asked["i2t_itc"]


def test_service_matches_albef_eval(
    answers: dict[str, Any], data: dict[str, Any], torch_model: Any, tokenizer: Any
) -> None:
    from albef.model.train.evaluate import compute_features, score_matrices

    feats = compute_features(
        torch_model,
        [Path(it["path"]) for it in data["images"]],
        [t["caption"] for t in data["texts"]],
        tokenizer,
        progress=False,
    )
    scores = score_matrices(torch_model, feats, k_test=K, progress=False)
    got = answers["content"]
    exact = _compare_all(got, _eval_rankings(scores, data), tol=2e-3)
    asked = {name: sum(a is not None for a in rows) for name, rows in got.items()}
    print(f"exact rankings vs albef eval: {exact} of {asked}")
    # fp16 token storage may swap a near-tied pair (measured: 1 of 159 text and 1 of 40 image queries with
    # this random model); ITC uses fp32 vectors and must be identical.
    assert exact["t2i_itc"] == asked["t2i_itc"] and exact["i2t_itc"] == asked["i2t_itc"]
    assert exact["t2i_itm"] >= 0.95 * asked["t2i_itm"] and exact["i2t_itm"] >= 0.9 * asked["i2t_itm"]
