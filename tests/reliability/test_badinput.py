"""Issue 9.1: a corpus of bad (and odd but valid) inputs against the real server, each with its exact answer.

Every bad input must get one specific 4xx with the ``{"error": {"code", "message"}}`` body, naming the field
where there is one, and without stack traces or file paths. Valid images in unusual formats (GIF, TIFF, WebP,
CMYK JPEG, 16-bit, palette, 1x1) must be decoded correctly: their results equal those of the same pixels sent
as a plain RGB PNG.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.reliability import answer, assert_error, assert_no_leak, same_answer
from tests.helpers.service import live_server, settings

MAX_UPLOAD = 1_000_000
MAX_PIXELS = 4_000_000
MAX_TEXT = 1000


@pytest.fixture(scope="module")
def server(service_index: Path):
    s = settings(
        service_index,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        max_text_chars=MAX_TEXT,
        max_k=100,
        batch_max_size=4,
    )
    with live_server(s) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


# -- image makers ----------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    """An RGB picture with a few flat regions (so that palette formats hold it exactly)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size[1] - 4), rng.integers(0, size[0] - 4)
        arr[y : y + size[1] // 2, x : x + size[0] // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def raw_png(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    channels: int = 1,
    extra: bytes = b"",
    rows: int | None = None,
) -> bytes:
    """A PNG written chunk by chunk: all-zero pixel rows, compressed as they stream (no big buffer); only
    ``rows`` of them if given (for headers that promise far more than the file holds)."""
    row = b"\0" * (1 + (width * bit_depth * channels + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height if rows is None else rows)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def upload(
    client: httpx.Client, data: bytes, name: str = "q.png", ctype: str = "image/png", **fields: str
) -> httpx.Response:
    return client.post("/v1/search/texts", files={"image": (name, data, ctype)}, data={"k": "5", **fields})


def raw_get(url: str, path: str) -> tuple[int, str]:
    """GET with the path sent byte for byte (httpx would normalise ``..`` segments away)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


# -- text queries ----------------------------------------------------------------------------------------
TEXT_CASES = [
    pytest.param({"text": ""}, 422, "validation_error", "text", id="empty"),
    pytest.param({"text": "   \t\n "}, 422, "empty_text", "text", id="whitespace"),
    pytest.param({"text": "?!... ,;"}, 422, "empty_text", "text", id="punctuation-only"),
    pytest.param({"text": "a red circle " * 7693}, 422, "text_too_long", "text", id="100k-chars"),
    pytest.param({"text": None}, 422, "validation_error", None, id="null-text"),
    pytest.param({"text": "a red circle", "k": 0}, 422, "validation_error", "k", id="k=0"),
    pytest.param({"text": "a red circle", "k": -1}, 422, "validation_error", "k", id="k=-1"),
    pytest.param({"text": "a red circle", "k": 10**9}, 422, "validation_error", "k", id="k=1e9"),
    pytest.param({"text": "a red circle", "k": 10**30}, 422, "validation_error", "k", id="k=1e30"),
    pytest.param({"text": "a red circle", "k": 2.5}, 422, "validation_error", "k", id="k-fraction"),
    pytest.param(
        {"text": "a red circle", "rerank_k": 0}, 422, "validation_error", "rerank_k", id="rerank_k=0"
    ),
    pytest.param(
        {"text": "a red circle", "colour": "red"}, 422, "validation_error", "colour", id="unknown-field"
    ),
    pytest.param({"item_id": 10**30}, 422, "validation_error", "item_id", id="item-id-beyond-int64"),
    pytest.param({"item_id": 2**63 - 1}, 404, "item_not_found", "item_id", id="item-id-int64-max"),
    pytest.param({"text": "a", "exclude": [10**30]}, 200, None, None, id="exclude-huge-id-is-harmless"),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), TEXT_CASES)
def test_text_query_corpus(
    client: httpx.Client, body: dict[str, Any], status: int, code: str | None, field: str | None
) -> None:
    r = client.post("/v1/search/images", json=body)
    if status == 200:
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 10
        return
    err = assert_error(r, status, code, field)
    assert len(r.content) < 4000, "an error must not echo a large input back"
    if code == "text_too_long":
        assert str(MAX_TEXT) in err["message"]


def test_bodies_that_are_not_json(client: httpx.Client) -> None:
    route = "/v1/search/images"
    # invalid UTF-8 inside JSON
    r = client.post(
        route, content=b'{"text": "\xff\xfe caf\xe9"}', headers={"content-type": "application/json"}
    )
    assert "parsed" in assert_error(r, 400, "bad_request")["message"]
    # lone surrogate escape: valid JSON, not a valid string
    assert_error(
        client.post(route, content=b'{"text": "\\ud800"}', headers={"content-type": "application/json"}),
        422,
        "validation_error",
        "text",
    )
    assert_error(
        client.post(route, content=b"", headers={"content-type": "application/json"}), 422, "validation_error"
    )
    assert_error(
        client.post(route, content=b"[1, 2, 3]", headers={"content-type": "application/json"}),
        422,
        "validation_error",
    )
    # wrong content types on both search routes
    for ctype in ("text/plain", "application/xml", "application/x-www-form-urlencoded", "image/png"):
        assert_error(
            client.post(route, content=b'{"text": "a red circle"}', headers={"content-type": ctype}),
            415,
            "unsupported_media_type",
        )
    assert_error(
        client.post(route, files={"text": ("t.txt", b"a red circle", "text/plain")}),
        415,
        "unsupported_media_type",
    )
    for ctype in ("text/plain", "application/xml", "image/png", "application/octet-stream"):
        assert_error(
            client.post("/v1/search/texts", content=b"\x89PNG...", headers={"content-type": ctype}),
            415,
            "unsupported_media_type",
        )
    # a multipart body that is not one
    assert_error(
        client.post(
            "/v1/search/texts",
            content=b"--xyz\r\n[]--xyz--\r\n",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        "bad_request",
    )


# -- image queries ---------------------------------------------------------------------------------------
def test_broken_and_hostile_images(client: httpx.Client) -> None:
    jpeg = encode(picture((64, 64)), "JPEG", quality=90)
    png = encode(
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG"
    )
    cases: list[tuple[str, bytes, int, str]] = [
        ("zero-byte", b"", 422, "invalid_image"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], 422, "invalid_image"),
        ("jpeg-header-only", jpeg[:20], 422, "invalid_image"),
        ("text-as-image", b"a red circle above a blue square\n" * 20, 422, "invalid_image"),
        ("html-as-image", b"<html><script>alert(1)</script></html>", 422, "invalid_image"),
        ("truncated-png", png[: len(png) * 2 // 3], 422, "invalid_image"),
        ("png-bad-crc", png[:-20] + bytes([png[-20] ^ 0xFF]) + png[-19:], 422, "invalid_image"),
        # decompression bombs: 1-bit 30000x30000 = 900 Mpx in a few kB; a header claiming 10^10 px
        ("png-bomb-900Mpx", raw_png(30000, 30000, 1, 0), 413, "image_too_large"),
        ("png-header-1e10px", raw_png(100000, 100000, 8, 0, rows=1), 413, "image_too_large"),
        ("20000x20000", raw_png(20000, 20000, 1, 0), 413, "image_too_large"),
        # a text chunk that inflates to 100 MB (Pillow's MAX_TEXT_CHUNK guard)
        (
            "ztxt-bomb",
            raw_png(
                8,
                8,
                8,
                2,
                channels=3,
                extra=_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * (100 << 20), 9)),
            ),
            422,
            "invalid_image",
        ),
    ]
    for name, data, status, code in cases:
        assert len(data) < MAX_UPLOAD, name  # the size limit is not what answers these
        r = upload(client, data)
        assert r.status_code == status, (name, r.text[:300])
        err = assert_error(r, status, code, "image")
        if code == "image_too_large":
            assert str(MAX_PIXELS) in err["message"], (name, err)
    # the same through JSON base64
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": base64.b64encode(b"GIF89a").decode()}),
        422,
        "invalid_image",
        "image",
    )
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": "not base64!"}),
        422,
        "invalid_image",
        "image_base64",
    )
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": ""}), 422, "validation_error", "image_base64"
    )


def test_upload_over_the_size_limit(client: httpx.Client) -> None:
    rng = np.random.default_rng(1)
    noise = encode(Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)), "PNG")
    assert MAX_UPLOAD < len(noise) < MAX_UPLOAD * 4 // 3  # over the image limit, under the request limit
    assert_error(upload(client, noise), 413, "payload_too_large", "image")
    assert_error(
        client.post("/v1/search/texts", json={"image_base64": base64.b64encode(noise).decode()}),
        413,
        "payload_too_large",
    )
    # over the request limit: refused from Content-Length, before the body is read
    assert_error(upload(client, noise * 2), 413, "payload_too_large")


def _formats() -> list[tuple[str, bytes, Image.Image]]:
    """(name, encoded bytes, the RGB image a correct decoder must produce)."""
    pic = picture()
    out = []
    gif = pic.quantize(16)
    out.append(("gif", encode(gif, "GIF"), gif.convert("RGB")))
    out.append(("tiff", encode(pic, "TIFF"), pic))
    out.append(("tiff-lzw", encode(pic, "TIFF", compression="tiff_lzw"), pic))
    out.append(("webp-lossless", encode(pic, "WEBP", lossless=True), pic))
    pal = pic.quantize(8)
    out.append(("palette-png", encode(pal, "PNG"), pal.convert("RGB")))
    rgba = pic.copy()
    rgba.putalpha(200)
    out.append(("rgba-png", encode(rgba, "PNG"), pic))
    grey = pic.convert("L")
    out.append(("greyscale-png", encode(grey, "PNG"), grey.convert("RGB")))
    # 16-bit greyscale: full-range values must map to 8 bits, not clip to white
    g16 = (np.asarray(grey, np.uint16) * 257).astype(np.uint16)
    out.append(("16bit-png", encode(Image.fromarray(g16), "PNG"), grey.convert("RGB")))
    cmyk_jpeg = encode(pic.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(cmyk_jpeg)) as im:
        assert im.mode == "CMYK"
        out.append(("cmyk-jpeg", cmyk_jpeg, im.convert("RGB")))
    out.append(
        (
            "1x1-png",
            encode(Image.new("RGB", (1, 1), (250, 20, 20)), "PNG"),
            Image.new("RGB", (1, 1), (250, 20, 20)),
        )
    )
    return out


def test_unusual_but_valid_formats_decode_correctly(client: httpx.Client) -> None:
    for name, data, expected in _formats():
        got = upload(client, data, name=f"q.{name}", ctype="application/octet-stream", rerank_k="8")
        assert got.status_code == 200, (name, got.text)
        assert len(got.json()["results"]) == 5, name
        ref = upload(client, encode(expected, "PNG"), rerank_k="8")
        assert ref.status_code == 200, ref.text
        assert same_answer(answer(got.json()), answer(ref.json()), tol=1e-5), name
        assert got.json()["query"]["bytes"] == len(data)


# -- item routes: path traversal and ids -----------------------------------------------------------------
TRAVERSAL = [
    ("/v1/items/../../etc/passwd", 404, "not_found"),
    ("/v1/items/1/image/../../../../etc/passwd", 404, "not_found"),
    ("/v1/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image", 404, "not_found"),
    ("/v1/items/1%2f..%2f..%2f..%2fetc%2fpasswd/image", 404, "not_found"),
    ("/v1/items/..%5c..%5cwin.ini/image", 422, "validation_error"),
    ("/v1/items/%00/image", 422, "validation_error"),
    ("/v1/items/~root/image", 422, "validation_error"),
    ("/v1/items/1e3/image", 422, "validation_error"),
    ("/v1/items/0x10/image", 422, "validation_error"),
    ("/v1/items/-1/image", 404, "item_not_found"),
    ("/v1/items/99999999999999999999999/image", 404, "item_not_found"),
    ("/v1/items/99999999999999999999999", 404, "item_not_found"),
    ("/static/../../../etc/passwd", 404, "not_found"),
    ("/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 404, "not_found"),
]


@pytest.mark.parametrize(("path", "status", "code"), TRAVERSAL)
def test_path_traversal_in_item_routes(server, path: str, status: int, code: str) -> None:
    got_status, body = raw_get(server.url, path)
    assert got_status == status, (path, body)
    err = json.loads(body)["error"]
    assert err["code"] == code and err["message"]
    assert "root:" not in body  # never the file
    # "no route <path>" echoes the client's own path; nothing else may look like a server path
    assert_no_leak(body.replace(urllib.parse.unquote(path), "<path>").replace(path, "<path>"))
