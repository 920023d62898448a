"""albef.client against a real uvicorn server: every endpoint (explain too), every image input, errors, retries on
503."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from albef.client import ApiError, AsyncClient, Client
from albef.service.schemas import ExplainResponse, SearchResponse
from tests.helpers.explain import format1_copy
from tests.helpers.index import make_folder
from tests.helpers.service import index_items, live_server, settings


@pytest.fixture(scope="module")
def server(service_index: Path):
    with live_server(settings(service_index)) as srv:
        yield srv


@pytest.fixture(scope="module")
def items(service_index: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return index_items(service_index)


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[float, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((time.monotonic(), request.url.path))
        return super().handle_request(request)


def test_client_round_trips_every_endpoint(server, items) -> None:
    images, texts = items
    with Client(server.url) as c, httpx.Client(base_url=server.url, timeout=60) as raw:
        assert c.ready()
        info = c.index_info()
        assert info.counts["image"] == len(images) and info.counts["text"] == len(texts)

        caption = texts[0]["caption"]
        got = c.search_images(caption, k=5, rerank_k=8)
        want = raw.post("/v1/search/images", json={"text": caption, "k": 5, "rerank_k": 8}).json()
        assert isinstance(got, SearchResponse)
        assert [h.id for h in got.results] == [h["id"] for h in want["results"]]
        assert got.rerank and got.k == 5 and all(h.match_probability is not None for h in got.results)
        by_item = c.search_images(item_id=texts[0]["id"], k=5, rerank=False, exclude=[got.results[0].id])
        assert got.results[0].id not in [h.id for h in by_item.results] and not by_item.rerank

        path = Path(images[0]["path"])
        data = path.read_bytes()
        want_texts = [
            h["id"]
            for h in raw.post("/v1/search/texts", files={"image": ("q", data)}, data={"k": "4"}).json()[
                "results"
            ]
        ]
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        for image in (path, str(path), data, io.BytesIO(data), pil):
            assert [h.id for h in c.search_texts(image, k=4).results] == want_texts, type(image)
        assert len(c.search_texts(item_id=images[0]["id"], k=3, exclude=[want_texts[0]]).results) == 3

        item = c.item(images[0]["id"])
        assert item.kind == "image" and item.sha256 == images[0]["sha256"]
        assert c.item_image(images[0]["id"]) == data


def test_client_errors_carry_the_servers_code(server, items) -> None:
    _, texts = items
    with Client(server.url) as c:
        with pytest.raises(ApiError) as e:
            c.search_images("  ...  ")
        assert e.value.status == 422 and e.value.code == "empty_text" and e.value.field == "text"
        with pytest.raises(ApiError) as e:
            c.item(10**12)
        assert e.value.status == 404 and e.value.code == "item_not_found"
        with pytest.raises(ApiError) as e:
            c.search_texts(b"not an image")
        assert 400 <= e.value.status < 500
        with pytest.raises(ApiError) as e:  # a text id where an image is expected
            c.search_texts(item_id=texts[0]["id"])
        assert e.value.status == 422
        with pytest.raises(ValueError, match="exactly one"):
            c.search_images("a red circle", item_id=1)
        with pytest.raises(TypeError, match="an image is"):
            c.search_texts(12345)


def test_client_retries_503_honouring_retry_after(tmp_path: Path) -> None:
    # A server whose index does not exist never becomes ready: every search is 503 not_ready, Retry-After 5.
    with live_server(settings(tmp_path / "no-index"), ready=False) as srv:
        transport = CountingTransport()
        with Client(srv.url, retries=2, max_retry_wait=0.2, transport=transport) as c:
            start = time.monotonic()
            with pytest.raises(ApiError) as e:
                c.search_images("a red circle")
            elapsed = time.monotonic() - start
        assert e.value.status == 503 and e.value.code == "not_ready" and e.value.retry_after == 5.0
        assert [p for _, p in transport.requests] == ["/v1/search/images"] * 3  # the first try + 2 retries
        gaps = [b - a for (a, _), (b, _) in zip(transport.requests, transport.requests[1:], strict=False)]
        assert all(g >= 0.2 for g in gaps) and elapsed >= 0.4  # waited Retry-After, capped at 0.2 s
        assert not Client(srv.url).ready()
        transport = CountingTransport()
        with Client(srv.url, retries=0, transport=transport) as c, pytest.raises(ApiError):
            c.search_images("a red circle")
        assert len(transport.requests) == 1


def test_async_client_gives_the_same_answers(server, items) -> None:
    images, texts = items
    caption = texts[1]["caption"]
    data = Path(images[1]["path"]).read_bytes()

    async def run() -> tuple[list[int], list[int], str]:
        async with AsyncClient(server.url) as c:
            assert await c.ready()
            a, b = await asyncio.gather(c.search_images(caption, k=5), c.search_texts(data, k=4))
            item = await c.item(images[1]["id"])
            return [h.id for h in a.results], [h.id for h in b.results], item.sha256

    a_ids, b_ids, sha = asyncio.run(run())
    with Client(server.url) as c:
        assert a_ids == [h.id for h in c.search_images(caption, k=5).results]
        assert b_ids == [h.id for h in c.search_texts(data, k=4).results]
    assert sha == images[1]["sha256"]


def test_client_sends_filters_and_thresholds(server, items) -> None:
    images, texts = items
    allowed = [it["id"] for it in images[1::3]]
    flt = {"id": {"in": allowed}}
    data = Path(images[0]["path"]).read_bytes()
    with Client(server.url) as c, httpx.Client(base_url=server.url, timeout=60) as raw:
        got = c.search_images(texts[2]["caption"], k=4, rerank_k=6, filter=flt, min_match_probability=0.0)
        want = raw.post(
            "/v1/search/images",
            json={
                "text": texts[2]["caption"],
                "k": 4,
                "rerank_k": 6,
                "filter": flt,
                "min_match_probability": 0.0,
            },
        ).json()
        assert [h.id for h in got.results] == [h["id"] for h in want["results"]] and len(got.results) == 4
        assert set(h.id for h in got.results) <= set(allowed)
        assert got.filter is not None and got.filter.matched == len(allowed) and got.filter.exact
        # every re-ranked candidate has a probability >= 0: nothing is cut, the first k are returned
        assert got.candidates == 6 and got.cut.min_match_probability == 0
        top = max(h.itc_score for h in got.results)
        high = c.search_images(texts[2]["caption"], k=4, rerank=False, filter=flt, min_itc_score=top)
        assert [h.itc_score for h in high.results] == [top] and high.cut.min_itc_score == 3

        # multipart: the filter travels as a JSON form field, thresholds as form fields
        text_ids = [it["id"] for it in texts[::2]]
        by_upload = c.search_texts(
            data, k=5, rerank=False, filter={"id": {"in": text_ids}}, min_itc_score=-1.0
        )
        by_json = raw.post(
            "/v1/search/texts",
            json={
                "image_base64": base64.b64encode(data).decode(),
                "k": 5,
                "rerank": False,
                "filter": {"id": {"in": text_ids}},
            },
        ).json()
        assert [h.id for h in by_upload.results] == [h["id"] for h in by_json["results"]]
        assert set(h.id for h in by_upload.results) <= set(text_ids) and by_upload.cut.min_itc_score == 0
        with pytest.raises(ApiError) as e:
            c.search_texts(data, filter={"width": {"gte": "wide"}})
        assert (
            e.value.status == 422 and e.value.code == "invalid_filter" and e.value.field == "filter.width.gte"
        )
        with pytest.raises(ApiError) as e:
            c.search_images("a red circle", rerank=False, min_match_probability=0.5)
        assert e.value.status == 422 and e.value.field == "min_match_probability"

    async def run() -> list[int]:
        async with AsyncClient(server.url) as ac:
            found = await ac.search_texts(item_id=images[0]["id"], k=3, filter={"id": {"in": text_ids}})
            return [h.id for h in found.results]

    with Client(server.url) as c:
        sync = c.search_texts(item_id=images[0]["id"], k=3, filter={"id": {"in": text_ids}})
    assert asyncio.run(run()) == [h.id for h in sync.results] and len(sync.results) == 3


def _same_explanation(got: ExplainResponse, want: ExplainResponse | dict[str, Any], tol: float = 0.0) -> None:
    """Equal but for the timings (and within ``tol`` in the numbers, for answers computed in other batches)."""
    if isinstance(want, dict):
        want = ExplainResponse.model_validate(want)
    a, b = got.model_dump(exclude={"timings_ms"}), want.model_dump(exclude={"timings_ms"})
    if tol == 0.0:
        assert a == b
        return
    numbers = ("grid", "words", "itm_score", "match_probability")
    assert {k: v for k, v in a.items() if k not in numbers} == {
        k: v for k, v in b.items() if k not in numbers
    }
    assert np.allclose(a["grid"], b["grid"], rtol=1e-5, atol=tol)
    assert (
        abs(a["itm_score"] - b["itm_score"]) <= tol
        and abs(a["match_probability"] - b["match_probability"]) <= tol
    )
    if a["words"] is not None:
        assert [w["token"] for w in a["words"]] == [w["token"] for w in b["words"]]
        assert np.allclose(
            [w["grid"] for w in a["words"]], [w["grid"] for w in b["words"]], rtol=1e-5, atol=tol
        )


def test_client_explains_an_indexed_image_and_an_upload(server, items) -> None:
    """explain() by item id (JSON) and by upload (multipart), from every image input: the server's own
    ExplainResponse, equal to the raw HTTP answer."""
    images, texts = items
    caption = texts[0]["caption"]
    img = images[0]["id"]
    path = Path(images[0]["path"])
    data = path.read_bytes()
    with Client(server.url) as c, httpx.Client(base_url=server.url, timeout=60) as raw:
        got = c.explain(caption, item_id=img, per_word=True)
        want = raw.post("/v1/explain", json={"text": caption, "item_id": img, "per_word": True})
        assert want.status_code == 200, want.text
        assert isinstance(got, ExplainResponse)
        _same_explanation(got, want.json())
        assert got.query == {"kind": "explain", "text": caption, "item_id": img}
        assert got.overlay_on == "image" and got.words is not None and len(got.words) == len(got.tokens)
        assert len(got.grid) == got.side and base64.b64decode(got.overlay_png_base64 or "").startswith(
            b"\x89PNG"
        )

        want_upload = raw.post(
            "/v1/explain",
            files={"image": ("q.png", data, "image/png")},
            data={"text": caption, "overlay": "false"},
        )
        assert want_upload.status_code == 200, want_upload.text
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        for image in (path, str(path), data, io.BytesIO(data), pil):
            up = c.explain(caption, image, overlay=False)
            if image is pil:  # sent as a PNG of its own: the same pixels, maybe other bytes
                up = up.model_copy(update={"query": want_upload.json()["query"]})
            _same_explanation(up, want_upload.json())
        assert up.words is None and up.overlay_png_base64 is None and up.overlay_on is None
        # the upload of an indexed image's file is explained as that item: the same map
        assert np.allclose(up.grid, got.grid, rtol=1e-4, atol=1e-6)
        with_overlay = c.explain(caption, data)
        assert with_overlay.overlay_on == "image" and with_overlay.overlay_png_base64
        assert (with_overlay.overlay_width, with_overlay.overlay_height) == (
            got.overlay_width,
            got.overlay_height,
        )


def test_async_client_explains_as_the_blocking_one(server, items) -> None:
    images, texts = items
    caption = texts[1]["caption"]
    img = images[1]["id"]
    data = Path(images[1]["path"]).read_bytes()

    async def run() -> tuple[ExplainResponse, ExplainResponse]:
        async with AsyncClient(server.url) as ac:
            return await asyncio.gather(
                ac.explain(caption, item_id=img, per_word=True), ac.explain(caption, data, overlay=False)
            )

    by_id, by_upload = asyncio.run(run())
    with Client(server.url) as c:
        # the two ran together (possibly encoded in one batch): equal up to float rounding
        _same_explanation(by_id, c.explain(caption, item_id=img, per_word=True), tol=1e-6)
        _same_explanation(by_upload, c.explain(caption, data, overlay=False), tol=1e-6)


def test_client_explain_errors_carry_the_servers_code(
    server, items, tiny_bundle: Path, tmp_path: Path
) -> None:
    images, texts = items
    with Client(server.url) as c:
        with pytest.raises(ApiError) as e:  # a text id where an image is expected
            c.explain("a red circle", item_id=texts[0]["id"])
        assert (e.value.status, e.value.code, e.value.field) == (422, "wrong_item_kind", "item_id")
        with pytest.raises(ApiError) as e:
            c.explain("a red circle", item_id=10**12)
        assert (e.value.status, e.value.code) == (404, "item_not_found")
        with pytest.raises(ApiError) as e:
            c.explain("", b"not an image")  # an empty text in a form is sent, and refused by the server
        assert (e.value.status, e.value.code, e.value.field) == (422, "validation_error", "text")
        with pytest.raises(ApiError) as e:
            c.explain("a red circle", b"not an image")
        assert (e.value.status, e.value.code) == (422, "invalid_image")
        with pytest.raises(ValueError, match="exactly one"):
            c.explain("a red circle", Path(images[0]["path"]), item_id=images[0]["id"])
        with pytest.raises(ValueError, match="exactly one"):
            c.explain("a red circle")

    # a bundle exported before the explain graph: 409, for the blocking and the async client alike
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    old = format1_copy(tiny_bundle, tmp_path / "old-bundle")
    make_folder(tmp_path / "images", 2)
    build(tmp_path / "index", Bundle.load(old), [tmp_path / "images"], BuildOptions(progress=False))
    old_images, _ = index_items(tmp_path / "index")
    with live_server(settings(tmp_path / "index")) as srv:
        with Client(srv.url) as c, pytest.raises(ApiError) as e:
            c.explain("a picture", item_id=old_images[0]["id"])
        assert (e.value.status, e.value.code) == (
            409,
            "explain_unavailable",
        ) and "albef export" in e.value.message

        async def run() -> ApiError:
            async with AsyncClient(srv.url) as ac:
                try:
                    await ac.explain("a picture", Path(old_images[0]["path"]).read_bytes())
                except ApiError as exc:
                    return exc
            raise AssertionError("no error")

        err = asyncio.run(run())
        assert (err.status, err.code) == (409, "explain_unavailable")
