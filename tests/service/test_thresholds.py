"""``min_itc_score`` and ``min_match_probability`` through a real server: what they drop, what the response
counts as cut, how they combine with re-ranking, filters and multipart uploads, and the 422s."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.service import index_items, live_server, settings


@pytest.fixture(scope="module")
def client(service_index: Path):
    with live_server(settings(service_index)) as srv, srv.client() as c:
        yield c


@pytest.fixture(scope="module")
def items(service_index: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return index_items(service_index)


def _post(c: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(resp: dict[str, Any]) -> list[int]:
    return [h["id"] for h in resp["results"]]


def _gap(values: list[float]) -> float:
    """A threshold in the middle of the widest gap between distinct values (robust to last-bit noise)."""
    v = sorted(set(values))
    lo, hi = max(zip(v, v[1:], strict=False), key=lambda p: p[1] - p[0])
    assert hi - lo > 1e-4, values
    return (lo + hi) / 2


def test_no_thresholds_cut_nothing(client: Any, items: Any) -> None:
    _, texts = items
    got = _post(client, "/v1/search/images", {"text": texts[0]["caption"], "k": 5, "rerank_k": 12})
    assert got["cut"] == {"min_itc_score": 0, "min_match_probability": 0}
    assert got["candidates"] == 12 and len(got["results"]) == 5 and got["filter"] is None


def test_min_itc_score_keeps_an_itc_prefix_and_counts_the_rest(client: Any, items: Any) -> None:
    _, texts = items
    body = {"text": texts[3]["caption"], "k": 20, "rerank": False}
    base = _post(client, "/v1/search/images", body)
    scores = [h["itc_score"] for h in base["results"]]
    # Inclusive: a threshold equal to the 7th score keeps it (FAISS Flat scores are deterministic).
    got = _post(client, "/v1/search/images", {**body, "min_itc_score": scores[6]})
    keep = sum(s >= scores[6] for s in scores)
    assert _ids(got) == _ids(base)[:keep] and keep >= 7
    assert got["cut"] == {"min_itc_score": 20 - keep, "min_match_probability": 0} and got["candidates"] == 20
    everything = _post(client, "/v1/search/images", {**body, "min_itc_score": 1.0})
    assert everything["results"] == [] and everything["cut"]["min_itc_score"] == 20


def test_min_itc_score_is_applied_before_re_ranking(client: Any, items: Any) -> None:
    images, _ = items
    body = {"item_id": images[2]["id"], "k": 10, "rerank_k": 10}
    plain = _post(client, "/v1/search/texts", {**body, "rerank": False})
    t = _gap([h["itc_score"] for h in plain["results"]][2:9])
    survivors = [h["id"] for h in plain["results"] if h["itc_score"] >= t]
    got = _post(client, "/v1/search/texts", {**body, "min_itc_score": t})
    assert sorted(_ids(got)) == sorted(survivors) and len(survivors) < 10
    assert got["cut"]["min_itc_score"] == 10 - len(survivors)
    full = {h["id"]: h for h in _post(client, "/v1/search/texts", body)["results"]}
    logits = [h["itm_score"] for h in got["results"]]
    assert logits == sorted(logits, reverse=True)  # the survivors re-ranked among themselves
    for h in got["results"]:
        assert abs(h["itm_score"] - full[h["id"]]["itm_score"]) < 1e-4
        assert h["itc_rank"] == survivors.index(h["id"]) + 1


def test_min_match_probability_drops_weaker_re_ranked_results(client: Any, items: Any) -> None:
    _, texts = items
    body = {"text": texts[5]["caption"], "k": 10, "rerank_k": 10}
    base = _post(client, "/v1/search/images", body)
    probs = [h["match_probability"] for h in base["results"]]
    t = _gap(probs)
    got = _post(client, "/v1/search/images", {**body, "min_match_probability": t})
    assert _ids(got) == [h["id"] for h in base["results"] if h["match_probability"] >= t]
    assert all(h["match_probability"] >= t for h in got["results"]) and 0 < len(got["results"]) < 10
    assert got["cut"] == {"min_itc_score": 0, "min_match_probability": 10 - len(got["results"])}


def test_results_after_the_re_ranked_head_have_no_probability_and_are_dropped(
    client: Any, items: Any
) -> None:
    _, texts = items
    body = {"text": texts[7]["caption"], "k": 12, "rerank_k": 4}
    base = _post(client, "/v1/search/images", body)
    assert [h["match_probability"] is None for h in base["results"]] == [False] * 4 + [True] * 8
    got = _post(client, "/v1/search/images", {**body, "min_match_probability": 0.0})
    assert _ids(got) == _ids(base)[:4]
    assert got["cut"]["min_match_probability"] == 8 and got["candidates"] == 12


def test_thresholds_and_a_filter_together(client: Any, items: Any) -> None:
    images, texts = items
    allowed = [it["id"] for it in images[::2]]
    body = {"text": texts[1]["caption"], "k": 8, "rerank_k": 8, "filter": {"id": {"in": allowed}}}
    base = _post(client, "/v1/search/images", body)
    assert set(_ids(base)) <= set(allowed) and base["filter"]["matched"] == len(allowed)
    t_itc = _gap([h["itc_score"] for h in base["results"]])
    got = _post(client, "/v1/search/images", {**body, "min_itc_score": t_itc, "min_match_probability": 0.0})
    assert set(_ids(got)) == {h["id"] for h in base["results"] if h["itc_score"] >= t_itc}
    assert got["cut"] == {"min_itc_score": 8 - len(got["results"]), "min_match_probability": 0}


def test_multipart_and_json_uploads_take_the_thresholds(client: Any, items: Any) -> None:
    images, _ = items
    data = Path(images[4]["path"]).read_bytes()
    body = {"k": 6, "rerank_k": 6}
    base = _post(client, "/v1/search/texts", {**body, "image_base64": base64.b64encode(data).decode()})
    t = _gap([h["match_probability"] for h in base["results"]])
    form = client.post(
        "/v1/search/texts",
        files={"image": ("q.png", data)},
        data={"k": "6", "rerank_k": "6", "min_match_probability": str(t), "min_itc_score": "-1"},
    )
    assert form.status_code == 200, form.text
    assert _ids(form.json()) == [h["id"] for h in base["results"] if h["match_probability"] >= t]
    assert form.json()["cut"]["min_match_probability"] == 6 - len(form.json()["results"])


BAD = [
    ({"rerank": False, "min_match_probability": 0.5}, "min_match_probability", "needs rerank=true"),
    ({"min_match_probability": 1.5}, "min_match_probability", ""),
    ({"min_match_probability": -0.1}, "min_match_probability", ""),
    ({"min_itc_score": 2}, "min_itc_score", ""),
    ({"min_itc_score": "high"}, "min_itc_score", ""),
]


@pytest.mark.parametrize(("extra", "field", "words"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_thresholds_are_422_naming_the_field(
    client: Any, items: Any, extra: dict[str, Any], field: str, words: str
) -> None:
    images, texts = items
    for path, query in (
        ("/v1/search/images", {"text": texts[0]["caption"]}),
        ("/v1/search/texts", {"item_id": images[0]["id"]}),
    ):
        r = client.post(path, json={**query, **extra})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert r.json()["error"]["code"] == "validation_error" and words in r.json()["error"]["message"]
    data = Path(images[0]["path"]).read_bytes()
    form = {key: str(v).lower() if isinstance(v, bool) else str(v) for key, v in extra.items()}
    r = client.post("/v1/search/texts", files={"image": ("q.png", data)}, data=form)
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_non_finite_thresholds_are_refused(client: Any, items: Any) -> None:
    images, _ = items
    data = Path(images[0]["path"]).read_bytes()
    for value in ("nan", "inf", "-inf"):
        r = client.post("/v1/search/texts", files={"image": ("q.png", data)}, data={"min_itc_score": value})
        assert r.status_code == 422 and r.json()["error"]["field"] == "min_itc_score", r.text
    r = client.post(
        "/v1/search/images",
        content=b'{"text": "a red circle", "min_itc_score": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
