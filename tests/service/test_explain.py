"""``POST /v1/explain`` through a real server (uvicorn on 127.0.0.1, ONNX Runtime): the heat map equals Grad-CAM
computed with torch autograd on the eager model, for an upload and for an indexed image; the PNG overlay; the
4xx errors; a format-1 bundle answers 409 and still searches; the OpenAPI document describes the route."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.explain import format1_copy, torch_gradcam
from tests.helpers.index import make_folder
from tests.helpers.service import index_items, live_server, settings

TOL = 1e-4
TEXT = "a large red square left of a small blue circle"
MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def server(service_index: Path) -> Iterator[Any]:
    with live_server(settings(service_index, max_upload_bytes=MAX_UPLOAD, max_text_chars=200)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from albef.model.factory import create_model

    return create_model(None, tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def gallery(service_index: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return index_items(service_index)


def torch_reference(model: Any, tokenizer: Any, text: str, image_tokens: Any) -> dict[str, Any]:
    """Grad-CAM by torch autograd for ``text`` (encoded by the torch text encoder) against image tokens."""
    import torch

    ids, mask = (torch.from_numpy(a) for a in tokenizer([text]))
    with torch.no_grad():
        _, text_tokens = model.encode_text(ids, mask)
    layer = 0  # the tiny model's default: the first of its two fusion layers (never the last)
    ref = torch_gradcam(model, layer, text_tokens, mask, torch.as_tensor(image_tokens))
    ref["n_tokens"] = int(mask.sum())
    return ref


def assert_grid(got: list[list[float]], want: np.ndarray) -> float:
    arr = np.asarray(got)
    assert arr.shape == want.shape
    diff = float(np.abs(arr - want).max())
    assert diff <= TOL and diff <= 1e-3 * float(np.abs(want).max()), diff  # absolute and relative
    return diff


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    assert err["message"]
    return err


def test_upload_explained_equals_torch_gradcam(
    client: httpx.Client, model: Any, tokenizer: Any, service_synth: Path
) -> None:
    """An uploaded image (multipart and base64 JSON give the same answer), per word: every map equals the
    official Grad-CAM computed by torch autograd from the torch encoders' features."""
    import torch

    from albef.model.image import preprocess

    entry = json.loads((service_synth / "test.json").read_text())[2]
    path = service_synth / entry["image"]
    form = client.post(
        "/v1/explain",
        files={"image": (path.name, path.read_bytes(), "image/png")},
        data={"text": TEXT, "per_word": "true", "overlay": "false"},
    )
    assert form.status_code == 200, form.text
    body = form.json()
    as_json = client.post(
        "/v1/explain",
        json={"text": TEXT, "image_base64": base64.b64encode(path.read_bytes()).decode(), "per_word": True},
    ).json()
    assert as_json["grid"] == body["grid"] and as_json["words"] == body["words"]

    cfg = model.config
    pixels = torch.from_numpy(preprocess([path], cfg.vision.image_res, cfg.mean, cfg.std))
    with torch.no_grad():
        _, image_tokens = model.encode_image(pixels)
    ref = torch_reference(model, tokenizer, TEXT, image_tokens)
    assert body["side"] == 6 and body["layer"] == {"fusion_layer": 0, "encoder_layer": 2}
    diffs = [assert_grid(body["grid"], ref["overall"])]
    # per word: the WordPieces after [CLS], each with its own row's map
    assert body["tokens"] == TEXT.split() and len(body["words"]) == ref["n_tokens"] - 1
    for i, word in enumerate(body["words"]):
        assert word["token"] == body["tokens"][i] and word["position"] == i + 1
        diffs.append(assert_grid(word["grid"], ref["per_token"][i + 1]))
    assert abs(body["itm_score"] - float(ref["logits"][1])) <= TOL
    logits = ref["logits"].astype(np.float64)
    assert abs(body["match_probability"] - 1 / (1 + np.exp(logits[0] - logits[1]))) <= 1e-5
    # the maps are not all alike: the words look at different patches
    words = np.asarray([w["grid"] for w in body["words"]])
    assert np.abs(words - words.mean(0)).max() > 1e-4 * np.abs(words).max() + 1e-9
    assert body["overlay_png_base64"] is None and body["overlay_on"] is None  # overlay: false
    assert set(body["timings_ms"]) == {"encode", "explain", "render", "total"}
    top = float(np.abs(ref["per_token"]).max())
    print(f"max |HTTP explain - torch Grad-CAM|: {max(diffs):.2e} (largest value {top:.2e})")  # noqa: T201


def test_indexed_image_explained_equals_torch_gradcam_and_the_search(
    client: httpx.Client, model: Any, tokenizer: Any, service_index: Path, service_synth: Path
) -> None:
    """An image result of a search, explained by item id: Grad-CAM on the features the re-ranking scored
    (the index's stored tokens) equals torch's; the match probability is the search hit's; the PNG overlay
    is drawn over the stored image, red where the map is high and the image where it is low."""
    from albef.index import IndexReader

    hit = client.post("/v1/search/images", json={"text": TEXT, "k": 3}).json()["results"][1]
    r = client.post("/v1/explain", json={"text": TEXT, "item_id": hit["id"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["words"] is None and body["query"] == {"kind": "explain", "text": TEXT, "item_id": hit["id"]}
    assert body["index_version"] == "000001"
    assert abs(body["match_probability"] - hit["match_probability"]) <= 1e-5
    assert abs(body["itm_score"] - hit["itm_score"]) <= TOL
    with IndexReader.open(service_index) as reader:
        stored = reader.image_tokens([hit["id"]])
    ref = torch_reference(model, tokenizer, TEXT, stored)
    assert_grid(body["grid"], ref["overall"])

    assert body["overlay_on"] == "image"
    png = base64.b64decode(body["overlay_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    overlay = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64)
    stored_png = client.get(hit["metadata"]["image_url"]).content
    original = np.asarray(Image.open(io.BytesIO(stored_png)).convert("RGB"), np.float64)
    assert overlay.shape == original.shape == (128, 128, 3)
    assert (body["overlay_width"], body["overlay_height"]) == (128, 128)
    grid = np.asarray(body["grid"])
    cell = 128 / body["side"]

    def centre(flat: int) -> tuple[int, int]:
        row, col = divmod(flat, body["side"])
        return int((row + 0.5) * cell), int((col + 0.5) * cell)

    hot, cold = centre(int(grid.argmax())), centre(int(grid.argmin()))
    red, green, blue = overlay[hot]
    assert red > 100 and green < 90 and blue < 90  # "jet" at the top of the scale, nearly opaque
    assert np.abs(overlay[cold] - original[cold]).max() < 60  # nearly transparent at the bottom
    assert np.abs(overlay - original).mean() > 5  # something was drawn


def test_overlay_without_the_stored_image(tmp_path: Path, tiny_bundle: Path) -> None:
    """An indexed image whose file is gone: still explained (from its stored features), and the overlay is
    the heat map alone at the model's resolution."""
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    make_folder(tmp_path / "images", 4)
    build(tmp_path / "index", Bundle.load(tiny_bundle), [tmp_path / "images"], BuildOptions(progress=False))
    images, _ = index_items(tmp_path / "index")
    for p in (tmp_path / "images").rglob("*.png"):
        p.unlink()
    with live_server(settings(tmp_path / "index")) as srv, srv.client() as c:
        body = c.post("/v1/explain", json={"text": "a picture", "item_id": images[0]["id"]}).json()
    assert body["overlay_on"] == "heatmap" and (body["overlay_width"], body["overlay_height"]) == (96, 96)
    heat = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert heat.size == (96, 96) and heat.mode == "RGB"


def test_bad_explain_requests_get_4xx_json(client: httpx.Client, gallery: Any, service_synth: Path) -> None:
    images, texts = gallery
    img = images[0]["id"]
    png = (service_synth / json.loads((service_synth / "test.json").read_text())[0]["image"]).read_bytes()
    b64 = base64.b64encode(png).decode()
    post = lambda **kw: client.post("/v1/explain", **kw)  # noqa: E731

    assert error_of(post(json={"text": "", "item_id": img}), 422, "validation_error")["field"] == "text"
    assert error_of(post(json={"text": " ?! ", "item_id": img}), 422, "empty_text")["field"] == "text"
    assert error_of(post(json={"text": "x" * 201, "item_id": img}), 422, "text_too_long")["field"] == "text"
    assert error_of(post(json={"item_id": img}), 422, "validation_error")["field"] == "text"
    assert error_of(post(json={"text": "a circle"}), 422, "validation_error")["field"] == "body"  # no image
    error_of(post(json={"text": "a circle", "item_id": img, "image_base64": b64}), 422, "validation_error")
    assert error_of(post(json={"text": "a", "item_id": -1}), 422, "validation_error")["field"] == "item_id"
    assert error_of(post(json={"text": "a", "item_id": img, "k": 3}), 422, "validation_error")["field"] == "k"
    assert error_of(post(json={"text": "a", "item_id": 10**9}), 404, "item_not_found")["field"] == "item_id"
    err = error_of(post(json={"text": "a", "item_id": texts[0]["id"]}), 422, "wrong_item_kind")
    assert "is a text" in err["message"] and err["field"] == "item_id"
    error_of(post(json={"text": "a", "image_base64": "not base64!"}), 422, "invalid_image")
    not_image = base64.b64encode(b"hello, not an image").decode()
    error_of(post(json={"text": "a", "image_base64": not_image}), 422, "invalid_image")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")  # a format outside the upload allow-list
    error_of(post(json={"text": "a", "image_base64": base64.b64encode(ico.getvalue()).decode()}), 415)
    big = base64.b64encode(b"\0" * (MAX_UPLOAD + 10)).decode()
    error_of(post(json={"text": "a", "image_base64": big}), 413, "payload_too_large")
    error_of(
        post(files={"image": ("x.png", b"\0" * (MAX_UPLOAD + 10), "image/png")}, data={"text": "a"}), 413
    )
    error_of(post(content=b"text=a", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    error_of(
        post(content=b"{not json", headers={"content-type": "application/json"}), 422, "validation_error"
    )
    error_of(post(json=["a", "list"]), 422, "validation_error")
    form = post(files={"image": ("x.png", png, "image/png")}, data={"text": "a", "k": "3"})
    assert error_of(form, 422, "validation_error")["field"] == "k"
    form = post(files={"image": ("x.png", png, "image/png")}, data={"text": "a", "per_word": "maybe"})
    assert error_of(form, 422, "validation_error")["field"] == "per_word"
    assert error_of(post(data={"text": "a", "item_id": str(img), "image": "text"}), 422)["field"] == "image"
    # and a good request on the same server still works after all of them
    assert post(json={"text": "a circle", "item_id": img, "overlay": False}).status_code == 200


def test_a_format_1_bundle_answers_409_and_still_searches(tiny_bundle: Path, tmp_path: Path) -> None:
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    old = format1_copy(tiny_bundle, tmp_path / "old-bundle")
    make_folder(tmp_path / "images", 4)
    build(tmp_path / "index", Bundle.load(old), [tmp_path / "images"], BuildOptions(progress=False))
    images, _ = index_items(tmp_path / "index")
    with live_server(settings(tmp_path / "index")) as srv, srv.client() as c:
        search = c.post("/v1/search/images", json={"text": "a picture", "k": 2})
        assert search.status_code == 200 and len(search.json()["results"]) == 2
        err = error_of(c.post("/v1/explain", json={"text": "a picture", "item_id": images[0]["id"]}), 409)
        assert err["code"] == "explain_unavailable" and "albef export" in err["message"]
        # a bad request is still a 422 first: the 409 is for requests that could be answered
        error_of(c.post("/v1/explain", json={"text": "a picture"}), 422, "validation_error")


def test_openapi_describes_explain(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/explain"]["post"]
    assert op["operationId"] == "explain"
    content = op["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert {"text", "item_id", "image_base64", "per_word", "overlay"} <= set(
        content["application/json"]["schema"]["properties"]
    )
    assert {"200", "401", "404", "409", "413", "415", "422", "503"} <= set(op["responses"])
    assert "explain graph" in op["responses"]["409"]["description"]
    schemas = spec["components"]["schemas"]
    response = schemas["ExplainResponse"]["properties"]
    assert {"grid", "side", "tokens", "words", "itm_score", "match_probability", "overlay_png_base64"} <= set(
        response
    )
    assert "clamped gradient" in response["grid"]["description"]
    assert set(schemas["WordHeatmap"]["properties"]) == {"token", "position", "grid"}


def test_explain_is_bounded_and_measured(service_index: Path, gallery: Any) -> None:
    """At most ALBEF_QUEUE_MAX explanations at a time: one more is a 503 ``overloaded`` with Retry-After, counted
    under stage ``explain``; the stage's latency is in /metrics."""
    from concurrent.futures import ThreadPoolExecutor

    img = gallery[0][0]["id"]
    with live_server(settings(service_index, queue_max=1, retry_after_s=3)) as srv, srv.client() as c:
        assert 'albef_queue_rejections_total{stage="explain"} 0.0' in c.get("/metrics").text

        def one(_: int) -> httpx.Response:
            with srv.client() as own:
                return own.post(
                    "/v1/explain", json={"text": "a red circle", "item_id": img, "per_word": True}
                )

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(16)))
        codes = sorted({r.status_code for r in answers})
        assert codes == [200, 503], codes
        refused = next(r for r in answers if r.status_code == 503)
        assert error_of(refused, 503, "overloaded") and refused.headers["retry-after"] == "3"
        metrics = c.get("/metrics").text
        rejected = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith('albef_queue_rejections_total{stage="explain"}')
        ]
        assert float(rejected[0].split()[-1]) == sum(r.status_code == 503 for r in answers)
        served = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith('albef_stage_duration_seconds_count{stage="explain"}')
        ]
        assert float(served[0].split()[-1]) == sum(r.status_code == 200 for r in answers)


def test_overlay_pieces_equal_the_official_tools() -> None:
    """The overlay's colour map is matplotlib's "jet" (within its 256-entry table) and its blur is
    ``scipy.ndimage.gaussian_filter``, the two tools the official notebook draws with."""
    import matplotlib

    from albef.service.explain import _gaussian_blur, jet

    v = np.linspace(0.0, 1.0, 2001)
    assert np.abs(jet(v) - matplotlib.colormaps["jet"](v)[:, :3]).max() < 0.02
    assert np.allclose(jet(np.array([0.0, 1.0])), [[0, 0, 0.5], [0.5, 0, 0]])
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).random((40, 64))
    for sigma in (0.7, 2.56, 6.0):
        assert np.abs(_gaussian_blur(x, sigma) - ndimage.gaussian_filter(x, sigma)).max() < 1e-12
