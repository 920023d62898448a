"""Readiness and index hot swap: the service waits for an index, follows new versions (add, delete) without a
restart, and requests that hold the old version finish on it."""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.service import copy_index, index_items, live_server, settings


def _wait_version(c: httpx.Client, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get("/readyz")
        if r.status_code == 200 and r.json()["index_version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the service did not switch to version {version}")


def test_waits_for_an_index_then_follows_new_versions(
    service_index: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    from albef.index.builder import BuildOptions, add, delete
    from albef.model.runtime import Bundle

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    s = settings(index_dir, bundle=tiny_bundle, reload_interval_s=0.1)
    with live_server(s, ready=False) as srv, srv.client() as c:
        # no version yet: alive, not ready, searches refused with 503
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = c.post("/v1/search/images", json={"text": "a red circle"})
        assert (
            r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        )
        assert c.get("/v1/index").status_code == 503

        # an index appears (as an indexer would publish it): picked up without a restart
        index_dir.rmdir()
        copy_index(service_index, index_dir)
        _wait_version(c, "000001")
        n_images = c.get("/v1/index").json()["counts"]["image"]

        # a request that leased version 1 keeps it across the swap
        state = srv.state
        with state.lease() as old_reader:
            # add a JPEG saved under a .png name: served with the type of its bytes
            src = tmp_path / "new"
            src.mkdir()
            Image.new("RGB", (50, 30), (10, 200, 90)).save(src / "odd.png", format="JPEG")
            (src / "odd.txt").write_text("a green rectangle that is new\n")
            add(index_dir, Bundle.load(tiny_bundle), [src], BuildOptions(progress=False, workers=1))
            _wait_version(c, "000002")
            assert old_reader.version == "000001" and old_reader.count("image") == n_images
            assert old_reader.item(0) is not None  # still open while leased
        with pytest.raises(sqlite3.ProgrammingError):
            old_reader.item(0)  # closed once its last lease ended

        info = c.get("/v1/index").json()
        assert info["version"] == "000002" and info["counts"]["image"] == n_images + 1
        images, texts = index_items(index_dir)
        new_id = next(it["id"] for it in images if it["width"] == 50)
        new_text_id = next(it["id"] for it in texts if it["caption"] == "a green rectangle that is new")
        by_new_text = c.post("/v1/search/images", json={"item_id": new_text_id, "k": 3}).json()
        assert by_new_text["index_version"] == "000002" and len(by_new_text["results"]) == 3
        img = c.get(f"/v1/items/{new_id}/image")
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(img.content)).size == (50, 30)

        # a delete is a new version too; the item disappears from the service
        delete(index_dir, [new_id])
        _wait_version(c, "000003")
        assert c.get(f"/v1/items/{new_id}").status_code == 404
        ids = [
            h["id"]
            for h in c.post(
                "/v1/search/images", json={"text": "a green rectangle", "k": 50, "rerank": False}
            ).json()["results"]
        ]
        assert new_id not in ids
        m = c.get("/metrics").text
        assert 'albef_index_reloads_total{result="ok"} 2.0' in m
        assert "albef_index_info{bundle=" in m and 'version="000003"' in m


def test_reader_handle_closes_after_the_last_lease(service_index: Path) -> None:
    from albef.index import IndexReader
    from albef.service.state import ReaderHandle

    h = ReaderHandle(IndexReader.open(service_index))
    a, b = h.acquire(), h.acquire()
    assert a is b is not None
    h.retire()
    h.release()
    assert a.item(0) is not None  # one lease left: still open
    h.release()
    with pytest.raises(sqlite3.ProgrammingError):
        a.item(0)
    assert h.acquire() is None  # a request that raced the swap retries with the new handle
    h2 = ReaderHandle(IndexReader.open(service_index))
    h2.retire()  # no lease: closed at once
    assert h2.acquire() is None


def test_a_version_of_another_bundle_is_refused_and_the_old_one_kept(
    service_index: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from albef.index.layout import set_current

    index_dir = copy_index(service_index, tmp_path / "index")
    with live_server(settings(index_dir, reload_interval_s=0.1)) as srv, srv.client() as c:
        # A version whose manifest names another bundle (as if built by another model) becomes current.
        v2 = index_dir / "versions" / "000002"
        shutil.copytree(index_dir / "versions" / "000001", v2)
        manifest = json.loads((v2 / "manifest.json").read_text())
        manifest["bundle_id"] = "0" * 64
        manifest["version"] = "000002"
        (v2 / "manifest.json").write_text(json.dumps(manifest))
        set_current(index_dir, "000002")
        deadline = time.monotonic() + 30
        while 'albef_index_reloads_total{result="error"} 1.0' not in (m := c.get("/metrics").text):
            assert time.monotonic() < deadline, "the refused reload was not counted"
            time.sleep(0.05)
        ready = c.get("/readyz").json()
        assert ready["index_version"] == "000001"  # still serving the version of its own bundle
        r = c.post("/v1/search/images", json={"text": "a red circle", "k": 2})
        assert r.status_code == 200 and r.json()["index_version"] == "000001"
        assert 'albef_index_reloads_total{result="ok"} 0.0' in m  # labels start at zero; no swap happened
        time.sleep(0.5)  # several polls later: the refused version is not retried
        assert 'albef_index_reloads_total{result="error"} 1.0' in c.get("/metrics").text
