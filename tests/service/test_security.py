"""Issue 9.6: the API key guards every route (enumerated from the app object, so a new route cannot slip
through), keys are compared with hmac.compare_digest, error bodies never carry stack traces or file paths,
and the item image route serves only the files (the bytes) that the index holds.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount

from tests.helpers.index import make_folder
from tests.helpers.reliability import assert_error, assert_no_leak
from tests.helpers.service import LiveServer, index_items, live_server, settings

KEY = "s3cret-Key-0123456789"
PROBES = {"/healthz", "/readyz"}
# The web search page holds no data and must load before the user has typed the key (service/web.py).
PAGE = {"/"}
PAGE_PREFIX = "/static"


@pytest.fixture(scope="module")
def keyed(service_index: Path):
    with live_server(settings(service_index, api_key=KEY)) as srv:
        yield srv


def concrete_requests(app: Any) -> list[tuple[str, str, str]]:
    """(method, concrete path, route template) for every route and method the app has, mounts included."""
    from fastapi import routing

    # FastAPI >= 0.16x keeps included routers lazily in app.routes; iter_route_contexts (what the OpenAPI
    # generator uses) flattens them. Older versions list every route in app.routes directly.
    flatten = getattr(routing, "iter_route_contexts", None)
    routes = list(flatten(app.routes)) if flatten is not None else list(app.routes)
    out = []
    for route in routes:
        if isinstance(getattr(route, "route", route), Mount):
            out.append(("GET", f"{route.path}/app.js", route.path))
            continue
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None) or {"GET"}
        if path is None:
            continue
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        out.extend((m, concrete, path) for m in sorted(methods))
    return out


def test_every_route_but_the_probes_needs_the_key(keyed, service_index: Path) -> None:
    reqs = concrete_requests(keyed.app)
    templates = {t for _, _, t in reqs}
    # the enumeration really sees the API (and the docs FastAPI adds)
    assert {
        "/v1/search/images",
        "/v1/search/texts",
        "/v1/items/{item_id}",
        "/v1/items/{item_id}/image",
        "/v1/index",
        "/metrics",
        "/openapi.json",
        "/docs",
    } <= templates
    captions = [t["caption"] for t in index_items(service_index)[1][:20]]
    open_seen = set()
    with keyed.client() as c:
        for method, path, template in reqs:
            body = {"json": {"text": "a red circle"}} if method == "POST" else {}
            anon = c.request(method, path, **body)
            if template in PROBES:
                assert anon.status_code in (200, 503), (method, path)
                open_seen.add(template)
                continue
            if template in PAGE or template == PAGE_PREFIX:
                # open by design: static files only, nothing from the index
                assert anon.status_code in (200, 404), (method, path)
                assert not any(cap in anon.text for cap in captions)
                open_seen.add(template)
                continue
            assert anon.headers.get("www-authenticate") == "Bearer", (method, path, anon.status_code)
            if method != "HEAD":  # a HEAD answer has no body
                err = assert_error(anon, 401, "unauthorized", secrets=(KEY,))
                assert "API key" in err["message"]
            assert anon.status_code == 401
            # wrong keys: same length, other length, empty, a prefix, the key with a suffix, lower case
            for wrong in ("x" * len(KEY), "short", "", KEY[:-1], KEY + "x", KEY.lower()):
                # (an empty value cannot follow "Bearer ": httpx refuses the trailing space)
                for headers in ({"X-API-Key": wrong}, {"Authorization": f"Bearer {wrong}".strip()}):
                    assert c.request(method, path, headers=headers, **body).status_code == 401, (path, wrong)
            # the right key, both ways: never 401
            for headers in (
                {"X-API-Key": KEY},
                {"Authorization": f"Bearer {KEY}"},
                {"authorization": f"bearer {KEY}"},
            ):
                assert c.request(method, path, headers=headers, **body).status_code != 401, (method, path)
        assert open_seen >= PROBES
        # methods a route does not have: still 401 first (nothing about the API is revealed without the key)
        assert_error(c.delete("/v1/index"), 401, "unauthorized")
        assert_error(c.get("/v1/does-not-exist"), 401, "unauthorized")
        assert c.get("/v1/does-not-exist", headers={"X-API-Key": KEY}).status_code == 404
        assert c.delete("/v1/index", headers={"X-API-Key": KEY}).status_code == 405


def test_key_comparison_uses_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware's own check, called directly: every decision goes through hmac.compare_digest."""
    import hmac

    from albef.service import middleware

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    mw = middleware.ApiKeyMiddleware(app=None, api_key=KEY)

    def scope(**headers: str) -> dict[str, Any]:
        return {
            "type": "http",
            "headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        }

    assert mw._authorised(scope(x_api_key=KEY))
    assert mw._authorised(scope(authorization=f"Bearer {KEY}"))
    for wrong in ("y" * len(KEY), "y", KEY[:-1] + "!"):  # equal and different lengths
        assert not mw._authorised(scope(x_api_key=wrong))
        assert not mw._authorised(scope(authorization=f"Bearer {wrong}"))
    assert len(calls) == 2 + 6
    assert all(b == KEY.encode() for _, b in calls)
    assert not mw._authorised(scope())  # no key at all: nothing to compare
    assert not mw._authorised(scope(authorization=f"Basic {KEY}"))
    # ALBEF_API_KEY="" means no key (not the empty key)
    from albef.settings import Settings

    assert Settings(api_key="").api_key is None


def test_unexpected_errors_are_generic(service_index: Path) -> None:
    """An exception inside a handler (here: a route added for the test that raises with a path and a secret
    in its message) is a 500 with a generic body: nothing of the exception reaches the client."""
    from albef.service.app import create_app

    app = create_app(settings(service_index))

    async def boom() -> None:
        raise RuntimeError(f"failed reading {service_index}/meta.sqlite: token={KEY}")

    app.add_api_route("/v1/boom", boom)
    srv = LiveServer(app).start()
    try:
        srv.wait_ready()
        with srv.client() as c:
            r = c.get("/v1/boom")
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
        assert_no_leak(r.text, secrets=(KEY, str(service_index)))
    finally:
        srv.stop()


# -- item image route: only the files (bytes) the index holds ----------------------------------------------
@pytest.fixture(scope="module")
def own_index(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> tuple[Path, Path]:
    """A small index over a private copy of image files, so that the test may tamper with them."""
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    root = tmp_path_factory.mktemp("sec")
    src = make_folder(root / "images", 6, seed0=700)
    build(
        root / "index",
        Bundle.load(tiny_bundle, intra_op_threads=1),
        [src],
        BuildOptions(progress=False, workers=1),
    )
    return root, root / "index"


def test_item_image_route_serves_only_indexed_files(own_index: tuple[Path, Path]) -> None:
    root, index_dir = own_index
    images, texts = index_items(index_dir)
    assert len(images) == 6
    secret = root / "outside" / "secret.png"
    make_folder(root / "outside-src", 1, seed0=999, captions=False)
    secret.parent.mkdir()
    shutil.copy(next((root / "outside-src").rglob("*.png")), secret)
    with live_server(settings(index_dir)) as srv, srv.client() as c:
        ok = c.get(f"/v1/items/{images[0]['id']}/image")
        assert ok.status_code == 200 and ok.content == Path(images[0]["path"]).read_bytes()
        assert ok.headers["content-type"] == "image/png" and ok.headers["x-content-type-options"] == "nosniff"
        # a text item, an unknown id, a negative id: no file
        assert_error(c.get(f"/v1/items/{texts[0]['id']}/image"), 404, "not_an_image")
        assert_error(c.get("/v1/items/123456/image"), 404, "item_not_found")
        # 1: the indexed file replaced by a symlink to a file outside the image folder
        p1 = Path(images[1]["path"])
        p1.unlink()
        os.symlink(secret, p1)
        r = c.get(f"/v1/items/{images[1]['id']}/image")
        assert_error(r, 404, "image_missing", secrets=(str(p1), str(secret)))
        assert r.content != secret.read_bytes()
        # 2: a symlink to the very same bytes is refused as well (the route never follows links)
        p2 = Path(images[2]["path"])
        same = root / "outside" / "copy.png"
        shutil.copy(p2, same)
        p2.unlink()
        os.symlink(same, p2)
        assert_error(c.get(f"/v1/items/{images[2]['id']}/image"), 404, "image_missing")
        # 3: the file overwritten with other image bytes (a regular file): the sha256 no longer matches
        p3 = Path(images[3]["path"])
        p3.write_bytes(secret.read_bytes())
        assert_error(c.get(f"/v1/items/{images[3]['id']}/image"), 404, "image_changed")
        # 4: the parent folder swapped for a symlink to a folder holding a same-named other file
        p4 = Path(images[4]["path"])
        decoy = root / "decoy"
        decoy.mkdir()
        shutil.copy(secret, decoy / p4.name)
        moved = p4.parent.with_name(p4.parent.name + "-moved")
        p4.parent.rename(moved)
        os.symlink(decoy, p4.parent)
        try:
            r = c.get(f"/v1/items/{images[4]['id']}/image")
            assert_error(r, 404, "image_changed")
        finally:
            p4.parent.unlink()
            moved.rename(p4.parent)
        # 5: a FIFO in place of the file: answered at once, no hang
        p5 = Path(images[5]["path"])
        p5.unlink()
        os.mkfifo(p5)
        assert_error(c.get(f"/v1/items/{images[5]['id']}/image", timeout=10), 404, "image_missing")
        # 6: deleted
        p0 = Path(images[0]["path"])
        p0.unlink()
        assert_error(c.get(f"/v1/items/{images[0]['id']}/image"), 404, "image_missing")
        # the item records themselves never expose a path
        for it in images:
            body = c.get(f"/v1/items/{it['id']}").text
            assert str(root) not in body and '"path"' not in body


def test_items_route_rejects_what_is_not_an_id(keyed) -> None:
    with httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEY}, timeout=30) as c:
        for bad in ("abc", "1.5", "1e3", "0x1f", "%20", "1;2"):
            assert_error(c.get(f"/v1/items/{bad}/image"), 422, "validation_error", "item_id")
        for missing in ("-1", "9223372036854775807", "9223372036854775808", "99999999999999999999999"):
            assert_error(c.get(f"/v1/items/{missing}/image"), 404, "item_not_found")
            assert_error(c.get(f"/v1/items/{missing}"), 404, "item_not_found")
