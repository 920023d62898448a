"""The REST API over a real uvicorn server: every endpoint, the response shapes, every error class, limits."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers.service import index_items, live_server, settings

MAX_UPLOAD = 200_000
MAX_PIXELS = 100_000


@pytest.fixture(scope="module")
def server(service_index: Path):
    s = settings(
        service_index,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        max_text_chars=200,
        max_k=50,
        max_rerank_k=64,
    )
    with live_server(s) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def items(service_index: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return index_items(service_index)


def png_bytes(size: tuple[int, int] = (48, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    if field is not None:
        assert err.get("field") == field, err
    # No stack traces or server paths in error bodies.
    assert "Traceback" not in r.text and "/tmp" not in r.text and ".py" not in r.text
    return err


# -- probes, index info, metrics ---------------------------------------------------------------------------
def test_probes_and_index_info(client: httpx.Client, service_index: Path, tiny_bundle: Path, items) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["index_version"] == "000001"
    info = client.get("/v1/index").json()
    images, texts = items
    assert info["counts"] == {"image": len(images), "text": len(texts)} and len(images) == 40
    assert info["version"] == "000001"
    assert info["factory"] == {"image": "Flat", "text": "Flat"}
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert info["model"]["bundle_id"] == manifest["bundle_id"] and info["model"]["name"] == "albef-tiny"
    spec = client.get("/openapi.json").json()
    assert {"/v1/search/images", "/v1/search/texts", "/v1/items/{item_id}", "/v1/index"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/search/texts"]["post"]["requestBody"]["content"]


# -- text -> images ------------------------------------------------------------------------------------
def check_hits(body: dict[str, Any], k: int, kind: str, reranked: int) -> list[dict[str, Any]]:
    hits = body["results"]
    assert len(hits) == k
    assert [h["rank"] for h in hits] == list(range(1, k + 1))
    assert len({h["id"] for h in hits}) == k
    assert set(body["timings_ms"]) >= {"encode", "ann", "rerank", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["ann"] >= 0
    head, tail = hits[:reranked], hits[reranked:]
    for h in hits:
        assert h["metadata"]["kind"] == kind and h["metadata"]["id"] == h["id"]
        assert "path" not in h["metadata"] and "source" not in h["metadata"]
    for h in head:
        assert h["itm_score"] is not None
        # match_probability = softmax(l0, l1)[1]; a logit pair is not returned, so check range and monotony.
        assert 0.0 < h["match_probability"] < 1.0
    assert [(-h["itm_score"], h["id"]) for h in head] == sorted((-h["itm_score"], h["id"]) for h in head)
    for h in tail:
        assert h["itm_score"] is None and h["match_probability"] is None
    assert [(-h["itc_score"], h["id"]) for h in tail] == sorted((-h["itc_score"], h["id"]) for h in tail)
    return hits


def test_search_images_shapes_and_orders(client: httpx.Client, items) -> None:
    text = items[1][0]["caption"]
    on = client.post("/v1/search/images", json={"text": text, "k": 8, "rerank_k": 16}).json()
    hits = check_hits(on, 8, "image", reranked=8)
    assert (
        on["query"] == {"kind": "text", "text": text}
        and on["k"] == 8
        and on["rerank_k"] == 16
        and on["rerank"]
    )
    for h in hits:
        assert h["metadata"]["image_url"] == f"/v1/items/{h['id']}/image"

    off = client.post("/v1/search/images", json={"text": text, "k": 16, "rerank": False}).json()
    check_hits(off, 16, "image", reranked=0)
    # The re-ranked top 8 come out of the ITC top 16; the ITC scores are the same numbers in both.
    itc = {h["id"]: h["itc_score"] for h in off["results"]}
    for h in hits:
        assert h["id"] in itc and h["itc_score"] == pytest.approx(itc[h["id"]], abs=1e-6)


def test_k_beyond_rerank_k_follows_in_itc_order(client: httpx.Client, items) -> None:
    text = items[1][3]["caption"]
    mixed = client.post("/v1/search/images", json={"text": text, "k": 12, "rerank_k": 5}).json()
    hits = check_hits(mixed, 12, "image", reranked=5)
    itc_only = client.post("/v1/search/images", json={"text": text, "k": 12, "rerank": False}).json()[
        "results"
    ]
    # The head is the ITC top 5 re-ordered by ITM; the tail is ITC positions 6..12 in ITC order.
    assert {h["id"] for h in hits[:5]} == {h["id"] for h in itc_only[:5]}
    assert [h["id"] for h in hits[5:]] == [h["id"] for h in itc_only[5:]]
    # itc_rank: where ITC alone put each result (the compare view); without re-ranking it is the rank itself
    position = {h["id"]: h["rank"] for h in itc_only}
    assert [h["itc_rank"] for h in hits] == [position[h["id"]] for h in hits]
    assert sorted(h["itc_rank"] for h in hits[:5]) == [1, 2, 3, 4, 5]
    assert all(h["itc_rank"] == h["rank"] for h in itc_only)


def test_match_probability_is_softmax_of_itm_logits(
    client: httpx.Client, items, tiny_bundle: Path, service_index: Path
) -> None:
    from albef.index import IndexReader
    from albef.model.runtime import Bundle

    text = items[1][5]["caption"]
    hits = client.post("/v1/search/images", json={"text": text, "k": 4, "rerank_k": 4}).json()["results"]
    bundle = Bundle.load(tiny_bundle)
    _, tok, mask = bundle.encode_texts([text])
    with IndexReader.open(service_index) as reader:
        feats = reader.image_tokens([h["id"] for h in hits])
    logits = bundle.itm_scores(np.repeat(tok, len(hits), 0), np.repeat(mask, len(hits), 0), feats)
    for h, lg in zip(hits, logits, strict=True):
        assert h["itm_score"] == pytest.approx(float(lg[1]), abs=1e-5)
        p = math.exp(lg[1]) / (math.exp(lg[0]) + math.exp(lg[1]))
        assert h["match_probability"] == pytest.approx(p, abs=1e-6)


def test_search_images_by_indexed_text_and_exclude(client: httpx.Client, items, service_index: Path) -> None:
    from albef.index import IndexReader

    text_item = items[1][7]
    r = client.post("/v1/search/images", json={"item_id": text_item["id"], "k": 5, "rerank": False})
    body = r.json()
    assert body["query"] == {"kind": "text", "item_id": text_item["id"]}
    with IndexReader.open(service_index) as reader:
        q = reader.vector("text", text_item["id"])
        image_ids = [it["id"] for it in items[0]]
        sims = np.stack([reader.vector("image", i) for i in image_ids]) @ q
    order = sorted(range(len(image_ids)), key=lambda j: (-sims[j], image_ids[j]))
    assert [h["id"] for h in body["results"]] == [image_ids[j] for j in order[:5]]
    # exclude drops the named items and still returns k results
    drop = [body["results"][0]["id"], body["results"][2]["id"]]
    ex = client.post(
        "/v1/search/images", json={"item_id": text_item["id"], "k": 5, "rerank": False, "exclude": drop}
    ).json()["results"]
    expected = [image_ids[j] for j in order if image_ids[j] not in drop][:5]
    assert [h["id"] for h in ex] == expected


# -- image -> texts ------------------------------------------------------------------------------------
def test_search_texts_upload_base64_dataurl_and_item(client: httpx.Client, items) -> None:
    image = items[0][3]
    data = Path(image["path"]).read_bytes()
    multipart = client.post(
        "/v1/search/texts", files={"image": ("q.png", data, "image/png")}, data={"k": "6", "rerank_k": "12"}
    ).json()
    hits = check_hits(multipart, 6, "text", reranked=6)
    assert multipart["query"] == {"kind": "image", "bytes": len(data)}
    b64 = base64.b64encode(data).decode()
    as_json = client.post("/v1/search/texts", json={"image_base64": b64, "k": 6, "rerank_k": 12}).json()
    data_url = client.post(
        "/v1/search/texts", json={"image_base64": "data:image/png;base64," + b64, "k": 6, "rerank_k": 12}
    ).json()
    for other in (as_json, data_url):
        assert [h["id"] for h in other["results"]] == [h["id"] for h in hits]
        assert [h["itm_score"] for h in other["results"]] == [h["itm_score"] for h in hits]
    # the same image by its id: same stored ITC vector, so the same ITC candidates and scores
    by_item = client.post("/v1/search/texts", json={"item_id": image["id"], "k": 12, "rerank": False}).json()
    fresh = client.post(
        "/v1/search/texts", files={"image": ("q.png", data, "image/png")}, data={"k": "12", "rerank": "false"}
    ).json()
    assert by_item["query"] == {"kind": "image", "item_id": image["id"]}
    assert [h["id"] for h in by_item["results"]] == [h["id"] for h in fresh["results"]]
    for a, b in zip(by_item["results"], fresh["results"], strict=True):
        assert a["itc_score"] == pytest.approx(b["itc_score"], abs=1e-5)
    # texts carry the image they were indexed with
    assert all(isinstance(h["metadata"]["image_id"], int) for h in hits)
    # multipart exclude as repeated fields and as a comma list
    drop = [hits[0]["id"], hits[1]["id"]]
    for form in ({"exclude": [str(d) for d in drop]}, {"exclude": f"{drop[0]},{drop[1]}"}):
        ex = client.post(
            "/v1/search/texts",
            files={"image": ("q.png", data, "image/png")},
            data={"k": "6", "rerank_k": "12", **form},
        ).json()
        assert not {h["id"] for h in ex["results"]} & set(drop)


# -- items ---------------------------------------------------------------------------------------------
def test_items_and_image_files(client: httpx.Client, items) -> None:
    image, text = items[0][0], items[1][0]
    got = client.get(f"/v1/items/{image['id']}").json()
    assert (
        got["kind"] == "image"
        and got["width"] == 128
        and got["height"] == 128
        and got["sha256"] == image["sha256"]
    )
    assert got["image_url"] == f"/v1/items/{image['id']}/image" and "path" not in got
    r = client.get(got["image_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == Path(image["path"]).read_bytes()
    t = client.get(f"/v1/items/{text['id']}").json()
    assert t["kind"] == "text" and t["caption"] == text["caption"] and t["image_url"] is None
    assert_error(client.get(f"/v1/items/{text['id']}/image"), 404, "not_an_image")
    assert_error(client.get("/v1/items/987654"), 404, "item_not_found")
    assert_error(client.get("/v1/items/-3"), 404, "item_not_found")
    assert_error(client.get("/v1/items/987654/image"), 404, "item_not_found")
    assert_error(client.get("/v1/items/abc"), 422, "validation_error", field="item_id")
    # paths are never taken from the client: traversal attempts are just unknown routes or bad ids
    assert client.get("/v1/items/..%2F..%2Fetc%2Fpasswd/image").status_code in (404, 422)
    assert_error(client.get("/v1/items/1/image/../../../../etc/passwd"), 404, "not_found")


# -- errors and limits ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"text": "a red circle", "bogus": 1}, "validation_error", "bogus"),
        ({"text": "a red circle", "k": 0}, "validation_error", "k"),
        ({"text": "a red circle", "k": 51}, "validation_error", "k"),
        ({"text": "a red circle", "k": "many"}, "validation_error", "k"),
        ({"text": "a red circle", "rerank_k": 65}, "validation_error", "rerank_k"),
        ({"text": "a red circle", "rerank": "perhaps"}, "validation_error", "rerank"),
        ({"text": 12}, "validation_error", "text"),
        ({"text": ""}, "validation_error", "text"),
        ({"text": "x" * 201}, "text_too_long", "text"),
        ({}, "validation_error", None),
        ({"text": "a", "item_id": 3}, "validation_error", None),
        ({"item_id": -1}, "validation_error", "item_id"),
        ({"text": "a", "exclude": ["x"]}, "validation_error", "exclude.0"),
    ],
)
def test_search_images_validation(
    client: httpx.Client, body: dict[str, Any], code: str, field: str | None
) -> None:
    assert_error(client.post("/v1/search/images", json=body), 422, code, field)


def test_request_errors(client: httpx.Client, items) -> None:
    image, text = items[0][0], items[1][0]
    assert_error(
        client.post("/v1/search/images", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "validation_error",
        "body",
    )
    assert_error(client.post("/v1/search/images", json=[1, 2]), 422, "validation_error")
    err = assert_error(
        client.post("/v1/search/images", json={"item_id": 987654}), 404, "item_not_found", "item_id"
    )
    assert err["message"].startswith("no item 987654 in index version ")
    err = assert_error(
        client.post("/v1/search/images", json={"item_id": image["id"]}), 422, "wrong_item_kind", "item_id"
    )
    assert err["message"] == f"item {image['id']} is an image; /v1/search/images needs an indexed text"
    err = assert_error(
        client.post("/v1/search/texts", json={"item_id": text["id"]}), 422, "wrong_item_kind", "item_id"
    )
    assert err["message"] == f"item {text['id']} is an text; /v1/search/texts needs an indexed image"
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": "***"}), 422, "invalid_image", "image_base64"
    )
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": base64.b64encode(b"hello").decode()}),
        422,
        "invalid_image",
        "image",
    )
    assert_error(
        client.post("/v1/search/texts", content=b"{", headers={"content-type": "application/json"}),
        422,
        "validation_error",
        "body",
    )
    assert_error(client.post("/v1/search/texts", json={"k": 3}), 422, "validation_error")
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": "aGVsbG8=", "zoom": 2}),
        422,
        "validation_error",
        "zoom",
    )
    assert_error(
        client.post("/v1/search/texts", content=b"abc", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    png = png_bytes()
    assert_error(
        client.post("/v1/search/texts", files={"image": ("a.png", png, "image/png")}, data={"zoom": "2"}),
        422,
        "validation_error",
        "zoom",
    )
    assert_error(
        client.post("/v1/search/texts", files={"other": ("a.png", png, "image/png")}),
        422,
        "validation_error",
        "other",
    )
    assert_error(
        client.post("/v1/search/texts", data={"image": "not a file", "k": "2"}),
        422,
        "validation_error",
        "image",
    )
    assert_error(client.post("/v1/search/texts", data={"k": "2"}), 422, "validation_error")
    assert_error(
        client.post("/v1/search/texts", files={"image": ("a.png", png, "image/png")}, data={"k": "x"}),
        422,
        "validation_error",
        "k",
    )
    assert_error(
        client.post("/v1/search/texts", files={"image": ("a.png", png[: len(png) // 2], "image/png")}),
        422,
        "invalid_image",
        "image",
    )
    assert_error(
        client.post("/v1/search/texts", files={"image": ("a.png", b"", "image/png")}),
        422,
        "invalid_image",
        "image",
    )
    assert_error(
        client.post(
            "/v1/search/texts",
            content=b"--x\r\nbad",
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        422,
        "validation_error",
    )
    assert_error(
        client.post("/v1/search/texts", content=b"garbage", headers={"content-type": "multipart/form-data"}),
        400,
        "bad_request",
    )
    two = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    assert_error(client.post("/v1/search/texts", files=two), 400, "bad_request")
    assert_error(client.get("/v1/search/images"), 405, "method_not_allowed")
    assert_error(client.get("/v1/nothing"), 404, "not_found")


# Pillow's DecompressionBombWarning is an error in the service (configure_pillow); pytest resets warning filters
# per test, so the test sets the same filter (it is process-wide, the server thread sees it).
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_upload_and_pixel_limits(client: httpx.Client) -> None:
    # bytes: an incompressible PNG just over the upload limit (multipart passes the body limit, not the image one)
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (270, 270, 3), dtype=np.uint8)).save(noisy, format="PNG")
    big = noisy.getvalue()
    assert MAX_UPLOAD < len(big) < MAX_UPLOAD * 4 // 3
    assert_error(
        client.post("/v1/search/texts", files={"image": ("a.png", big, "image/png")}),
        413,
        "payload_too_large",
        "image",
    )
    # the whole body: refused from Content-Length before it is read, and while streaming when chunked
    huge = b"0" * (MAX_UPLOAD * 2)
    assert_error(
        client.post("/v1/search/texts", content=huge, headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )

    def chunks():
        for _ in range(8):
            yield b" " * (MAX_UPLOAD // 2)

    assert_error(
        client.post("/v1/search/texts", content=chunks(), headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": base64.b64encode(big * 2).decode()}),
        413,
        "payload_too_large",
    )
    # pixels: a tiny file that decodes to more pixels than allowed (the header is checked before decoding),
    # and one beyond Pillow's own 2x bomb limit
    for side in (400, 1000):
        bomb = png_bytes((side, side))
        assert len(bomb) < 20_000
        assert_error(
            client.post("/v1/search/texts", files={"image": ("b.png", bomb, "image/png")}),
            413,
            "image_too_large",
            "image",
        )
    # within limits the same route works
    ok = client.post(
        "/v1/search/texts", files={"image": ("s.png", png_bytes((300, 300)), "image/png")}, data={"k": "2"}
    )
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_metrics(client: httpx.Client, items) -> None:
    client.post("/v1/search/images", json={"text": "a blue square", "k": 2})
    client.post("/v1/search/images", json={"text": "a blue square", "k": 0})
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    body = text.text
    assert 'albef_http_requests_total{method="POST",route="/v1/search/images",status="200"}' in body
    assert 'albef_http_requests_total{method="POST",route="/v1/search/images",status="422"}' in body
    assert 'albef_http_requests_total{method="GET",route="/v1/items/{item_id}",status="404"}' in body
    for stage in ("encode_text", "ann", "rerank", "features"):
        assert f'albef_stage_duration_seconds_bucket{{le="+Inf",stage="{stage}"}}' in body
    assert f'albef_index_items{{kind="image"}} {float(len(items[0]))}' in body
    assert 'albef_queue_depth{stage="encode_text"} 0.0' in body
    assert "albef_batch_size_count" in body and "albef_ready 1.0" in body


# -- no client input produces a 500 --------------------------------------------------------------------
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(-5, 2**64), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_bodies = st.dictionaries(
    st.sampled_from(["text", "k", "rerank", "rerank_k", "item_id", "exclude", "image_base64", "x"]),
    _values,
    max_size=5,
)


@hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies, route=st.sampled_from(["/v1/search/images", "/v1/search/texts"]))
def test_fuzzed_bodies_never_500(client: httpx.Client, body: dict[str, Any], route: str) -> None:
    r = client.post(
        route, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"code", "message"}
