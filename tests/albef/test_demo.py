"""``albef demo``: the cold run builds bundle, gallery and index; a warm run reuses them (without torch); a
changed checkpoint or gallery rebuilds exactly what depends on it; the command serves the page and the API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO
from tests.helpers.demo import TEST_SYNTH, PreparedDemo
from tests.helpers.readiness import accepts_connections, wait_until_ready


def _stamp(cache: Path) -> dict:
    return json.loads((cache / "demo.json").read_text())


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_cold_run_builds_every_step(prepared_demo: PreparedDemo, demo_checkpoint: Path) -> None:
    from albef.demo import checkpoint_sha256
    from albef.index import IndexReader
    from albef.model.runtime import read_manifest

    res = prepared_demo.result
    assert res.rebuilt == {"bundle": True, "data": True, "index": True}
    # progress: one numbered line per step, in order
    assert [line.split(" ", 1)[0] for line in prepared_demo.lines] == ["1/4", "2/4", "3/4"]
    assert "exporting" in prepared_demo.lines[0] and "generating" in prepared_demo.lines[1]
    manifest = read_manifest(res.bundle)
    stamp = _stamp(prepared_demo.cache)
    assert stamp["bundle"]["bundle_id"] == manifest["bundle_id"]
    assert stamp["bundle"]["key"]["checkpoint_sha256"] == checkpoint_sha256(demo_checkpoint)
    assert manifest["model"]["name"] == "albef-tiny-synth"
    # the gallery is the test split of the synthetic data, images and captions
    test_split = json.loads((res.data / "test.json").read_text())
    with IndexReader.open(res.index, bundle_id=manifest["bundle_id"]) as reader:
        assert reader.count("image") == len(test_split) > 0
        assert reader.count("text") == len({c for e in test_split for c in e["caption"]})
    assert not [p.name for p in prepared_demo.cache.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_warm_run_reuses_the_cache_without_torch(prepared_demo: PreparedDemo, tmp_path: Path) -> None:
    """The CLI in a fresh interpreter: every step cached, nothing rewritten, torch never imported."""
    cache = _copy_cache(prepared_demo.cache, tmp_path / "cache")
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    code = (
        "import sys; from albef.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "demo",
            "--no-serve",
            "--cache",
            str(cache),
            "--images",
            str(TEST_SYNTH["images"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "ALBEF_LOG_LEVEL": "WARNING"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if re.match(r"\d/4 ", ln)]
    assert lines == [
        f"1/4 model bundle: cached ({cache / 'bundle'})",
        f"2/4 synthetic gallery: cached ({cache / 'data'})",
        f"3/4 index: cached ({cache / 'index'})",
    ], proc.stderr
    assert "albef serve --index" in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_changed_gallery_rebuilds_data_and_index_only(
    prepared_demo: PreparedDemo, demo_checkpoint: Path, tmp_path: Path
) -> None:
    from albef.demo import prepare
    from albef.index import IndexReader

    cache = _copy_cache(prepared_demo.cache, tmp_path / "cache")
    synth = {**TEST_SYNTH, "images": 200}
    res = prepare(cache, checkpoint=demo_checkpoint, synth=synth, progress=False, say=lambda _: None)
    assert res.rebuilt == {"bundle": False, "data": True, "index": True}
    assert json.loads((res.data / "dataset.json").read_text())["seed"] == synth["seed"]
    n_test = len(json.loads((res.data / "test.json").read_text()))
    with IndexReader.open(res.index) as reader:
        assert reader.count("image") == n_test
    assert 0 < n_test < len(json.loads((prepared_demo.result.data / "test.json").read_text()))
    assert _stamp(cache)["data"]["key"]["images"] == 200
    # a missing output is rebuilt even if the stamp matches
    shutil.rmtree(res.index)
    res2 = prepare(cache, checkpoint=demo_checkpoint, synth=synth, progress=False, say=lambda _: None)
    assert res2.rebuilt == {"bundle": False, "data": False, "index": True}


def test_changed_checkpoint_rebuilds_the_bundle_and_index(
    prepared_demo: PreparedDemo, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Another checkpoint (other weights): a new bundle, hence a new index; the gallery is kept."""
    from albef.demo import checkpoint_sha256, prepare
    from albef.index import IndexReader
    from albef.model.runtime import read_manifest

    cache = _copy_cache(prepared_demo.cache, tmp_path / "cache")
    old_id = _stamp(cache)["bundle"]["bundle_id"]
    lines: list[str] = []
    res = prepare(cache, checkpoint=tiny_checkpoint, synth=TEST_SYNTH, progress=False, say=lines.append)
    assert res.rebuilt == {"bundle": True, "data": False, "index": True}
    new_id = read_manifest(res.bundle)["bundle_id"]
    assert new_id != old_id
    stamp = _stamp(cache)
    assert stamp["bundle"] == {"key": stamp["bundle"]["key"], "bundle_id": new_id}
    assert stamp["bundle"]["key"]["checkpoint_sha256"] == checkpoint_sha256(tiny_checkpoint)
    with IndexReader.open(res.index) as reader:
        assert reader.manifest["bundle_id"] == new_id


def test_the_demo_lives_outside_the_service() -> None:
    """service/ is serving only: the demo (export, synthetic data, index builds) is albef.demo."""
    import importlib.util

    from albef.cli import COMMAND_MODULES

    assert importlib.util.find_spec("albef.service.demo") is None
    assert importlib.util.find_spec("albef.service.demo_cli") is None
    assert "albef.demo_cli" in COMMAND_MODULES


def test_cache_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from albef.demo import default_cache_dir

    monkeypatch.delenv("ALBEF_DEMO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "albef-search" / "demo"
    monkeypatch.setenv("ALBEF_DEMO_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_gallery_holds_no_training_scene() -> None:
    """The demo's scenes come from a seed the shipped recipe does not train on: none of them is a scene of its
    training data (a generation with the recipe's seed would repeat its first scenes)."""
    import yaml

    from albef.demo import DEMO_SYNTH
    from albef.model.data.synth import make_scenes

    recipe = yaml.safe_load((REPO / "model" / "train" / "recipes" / "tiny-synth-truth.yaml").read_text())
    synth = recipe["data"]["synth"]
    assert DEMO_SYNTH["seed"] != synth["seed"] and DEMO_SYNTH["size"] == synth["size"]
    trained = {s.objects for s in make_scenes(synth["images"], synth["seed"])}
    gallery = make_scenes(DEMO_SYNTH["images"], DEMO_SYNTH["seed"])
    assert not any(s.objects in trained for s in gallery)
    # the check can fail: the recipe's seed at the gallery's size repeats its scenes
    assert any(s.objects in trained for s in make_scenes(DEMO_SYNTH["images"], synth["seed"]))


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from albef.cli import main

    assert (
        main(["demo", "--no-serve", "--cache", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "nope")])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("albef demo: error: model checkpoint not found")
    assert main(["demo", "--no-serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["demo", "--no-serve", "--images", "5"]) == 2
    assert "--images" in capsys.readouterr().err
    with socket.socket() as busy:  # a port in use is refused before any work
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--cache", str(tmp_path / "c2"), "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "pass another --port" in err
    assert not (tmp_path / "c2").exists()


def test_demo_command_serves_the_page_and_the_api(prepared_demo: PreparedDemo, tmp_path: Path) -> None:
    """``albef demo --port 0`` on a warm cache: the page at /, a real search over HTTP, Ctrl+C stops it."""
    cache = _copy_cache(prepared_demo.cache, tmp_path / "cache")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "albef",
            "demo",
            "--cache",
            str(cache),
            "--port",
            "0",
            "--images",
            str(TEST_SYNTH["images"]),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "ALBEF_LOG_LEVEL": "WARNING", "ALBEF_API_KEY": ""},
    )
    try:
        url = None
        deadline = time.monotonic() + 90
        seen = []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"^4/4 serving the search page at (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        # Announced only once the socket accepts connections: the first connect, without retry, succeeds.
        assert accepts_connections(url)
        wait_until_ready(url, proc=proc, timeout=max(1.0, deadline - time.monotonic()))
        with httpx.Client(base_url=url, timeout=30) as client:
            page = client.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            for asset in ("/static/app.js", "/static/app.css"):
                assert client.get(asset).status_code == 200
            r = client.post("/v1/search/images", json={"text": "a small red circle", "k": 5})
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert len(hits) == 5 and all(h["metadata"]["image_url"] for h in hits)
            assert client.get(hits[0]["metadata"]["image_url"]).headers["content-type"] == "image/png"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 0
    assert proc.stderr.read().rstrip().endswith("stopped")
