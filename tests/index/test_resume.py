"""Crash safety: a build killed with SIGKILL between shards resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from albef.cli import main as cli_main
from albef.index import builder, publish
from albef.index.builder import BuildOptions
from albef.index.reader import IndexReader, current_version
from tests.helpers import SLOW_SHARDS
from tests.helpers.index import assert_same_snapshot, make_folder, snapshot

N_IMAGES = 24
ARGS = [
    "--shard-size",
    "3",
    "--text-shard-size",
    "4",
    "--batch-size",
    "2",
    "--workers",
    "2",
    "--threads",
    "1",
    "--no-progress",
]


def test_sigkill_mid_build_then_resume_equals_uninterrupted(
    index_bundle, index_bundle_dir: Path, tmp_path: Path
) -> None:
    src = make_folder(tmp_path / "src", N_IMAGES, seed0=200)
    (src / "part0" / "zz-broken.png").write_bytes(b"garbage")
    ref = tmp_path / "ref"
    builder.build(
        ref,
        index_bundle,
        [src],
        BuildOptions(shard_size=3, text_shard_size=4, batch_size=2, workers=2, progress=False),
    )
    out = tmp_path / "crashed"
    cmd = [
        sys.executable,
        str(SLOW_SHARDS),
        "0.4",
        "index",
        "build",
        "--model",
        str(index_bundle_dir),
        "--out",
        str(out),
        *ARGS,
        str(src),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / "work" / "pending" / "shards"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if shards.is_dir() and len(list(shards.glob("img-*.npz"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    committed = sorted(p.name for p in shards.glob("*.npz"))
    assert 3 <= len(committed) < 9 + 6 and current_version(out) is None  # nothing published
    assert not list(shards.glob("*.tmp"))  # a half-written shard would be a *.tmp, never an *.npz
    # without --resume the interrupted build is not silently discarded
    assert (
        cli_main(["index", "build", "--model", str(index_bundle_dir), "--out", str(out), *ARGS, str(src)])
        == 1
    )
    assert (
        cli_main(
            [
                "index",
                "build",
                "--model",
                str(index_bundle_dir),
                "--out",
                str(out),
                *ARGS,
                "--resume",
                str(src),
            ]
        )
        == 0
    )
    with IndexReader.open(out) as r:
        report = r.manifest
    rep = json.loads((out / "versions" / "000001" / "report.json").read_text())
    assert rep["resumed"] is True and rep["items_done_before_this_run"] >= 9
    assert rep["throughput"]["items_encoded_this_run"] < N_IMAGES + N_IMAGES
    assert report["counts"] == {"image": N_IMAGES, "text": N_IMAGES}
    assert [f["path"] for f in rep["failed"]] == [str((src / "part0" / "zz-broken.png").resolve())]
    assert_same_snapshot(snapshot(ref), snapshot(out))
    assert not (out / "work" / "pending").exists()


def test_crash_while_publishing_leaves_no_trace(
    index_bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the segment is written but before the version is renamed: the pointer does not move,
    temporary folders are removed, and the next attempt (resume) publishes normally."""
    src = make_folder(tmp_path / "src", 4, seed0=300)
    out = tmp_path / "idx"
    opts = BuildOptions(shard_size=2, progress=False)
    real = publish.publish_version

    def boom(*a, **kw):  # noqa: ANN002, ANN003
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(publish, "publish_version", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        builder.build(out, index_bundle, [src], opts)
    assert current_version(out) is None
    assert not (out / "versions").exists() or not list((out / "versions").iterdir())
    monkeypatch.setattr(publish, "publish_version", real)
    res = builder.build(out, index_bundle, [src], opts, resume=True)
    assert res.report["resumed"] is True and res.report["throughput"]["items_encoded_this_run"] == 0
    assert sorted(p.name for p in (out / "segments").iterdir()) == ["seg-000001"]
    with IndexReader.open(out) as r:
        assert r.count("image") == 4
