"""Issue 9.4: crash safety.

* ``albef index add`` SIGKILLed at random points (several seeds: while planning, between shards, while
  publishing) never leaves the published index unreadable: after every kill the ``current`` version opens,
  searches and holds exactly what it held before; ``--resume`` then completes the change, and the result
  equals an uninterrupted add (ids, vectors, metadata).
* A service SIGKILLed at random moments (while loading, while serving) and restarted comes back with the
  last published version, including one published while it was down.

(``tests/index/test_resume.py`` covers a kill of a fresh build between shards; these add random kill
points, the publish step, an existing published index, and the service.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from albef.cli import main as cli_main
from tests.helpers import REPO, SLOW_SHARDS
from tests.helpers.index import assert_same_snapshot, make_folder, snapshot
from tests.helpers.reliability import ServerProcess, answer, reference_answers, same_answer
from tests.helpers.service import copy_index, index_items

N_NEW = 10
OPTS = [
    "--shard-size",
    "2",
    "--text-shard-size",
    "3",
    "--batch-size",
    "2",
    "--workers",
    "1",
    "--threads",
    "1",
    "--no-progress",
]


def kill_add_at(
    index_dir: Path, bundle: Path, src: Path, point: str, rng: random.Random, *, resume: bool
) -> str:
    """Run ``albef index add`` in a child process and SIGKILL it at ``point``: "early" (a random moment in
    the first second: imports, plan), "shards" (after a random number of committed shards), "publish" (as
    soon as the new version's temporary folder appears). Returns where it really died."""
    cmd = [
        sys.executable,
        str(SLOW_SHARDS),
        "0.15",
        "index",
        "add",
        "--index",
        str(index_dir),
        "--model",
        str(bundle),
        *OPTS,
        *(["--resume"] if resume else []),
        str(src),
    ]
    env = {**os.environ, "ALBEF_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = index_dir / "work" / "pending" / "shards"
    versions = index_dir / "versions"
    target = rng.randint(1, 6)
    t_early = time.monotonic() + rng.uniform(0.05, 1.0)
    died = "finished"
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if point == "early" and time.monotonic() >= t_early:
                died = "early"
            elif point == "shards" and shards.is_dir() and len(list(shards.glob("*.npz"))) >= target:
                died = f"after {target} shards"
            elif point == "publish" and any(p.name.startswith(".tmp-") for p in versions.iterdir()):
                died = "publishing"
            if died != "finished":
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.003)
    finally:
        if proc.poll() is None and died == "finished":
            proc.kill()
        proc.wait(timeout=30)
    return died if proc.returncode == -signal.SIGKILL else "finished"


@pytest.fixture(scope="module")
def reference(
    service_index: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """The new images and the snapshot of an uninterrupted add of them."""
    root = tmp_path_factory.mktemp("crash")
    src = make_folder(root / "new", N_NEW, seed0=800)
    ref = copy_index(service_index, root / "ref")
    assert cli_main(["index", "add", "--index", str(ref), "--model", str(tiny_bundle), *OPTS, str(src)]) == 0
    return src, snapshot(ref, search_queries=8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_add_never_breaks_the_published_index_and_resumes(
    seed: int, reference: tuple[Path, dict], service_index: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    src, ref = reference
    rng = random.Random(seed)
    index_dir = copy_index(service_index, tmp_path / "index")
    before = snapshot(index_dir, search_queries=8)
    # two kills per seed: the first at a random point, the second (resuming) at another one
    points = rng.sample(["early", "shards", "publish"], 2)
    deaths = []
    for n, point in enumerate(points):
        died = kill_add_at(index_dir, tiny_bundle, src, point, rng, resume=n > 0)
        deaths.append(died)
        if died == "finished":
            break
        # the published index is intact and unchanged; nothing half-written is visible as a version
        assert_same_snapshot(snapshot(index_dir, search_queries=8), before)
    print(f"seed {seed}: killed {deaths}")
    assert any(d != "finished" for d in deaths), deaths
    # --resume completes the change: equal to the uninterrupted add (the version number may be higher when a
    # version folder had been renamed into place but not yet pointed to)
    if deaths[-1] != "finished":
        assert (
            cli_main(
                [
                    "index",
                    "add",
                    "--index",
                    str(index_dir),
                    "--model",
                    str(tiny_bundle),
                    *OPTS,
                    "--resume",
                    str(src),
                ]
            )
            == 0
        )
    after = snapshot(index_dir, search_queries=8)
    assert_same_snapshot(after, ref, version=False)
    assert int(after["version"]) >= 2
    assert not (index_dir / "work" / "pending").exists()
    assert not [p for p in (index_dir / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in (index_dir / "segments").iterdir() if p.name.startswith(".tmp-")]


def test_service_killed_at_random_moments_comes_back_with_the_last_version(
    service_index: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    index_dir = copy_index(service_index, tmp_path / "index")
    text = index_items(index_dir)[1][0]["caption"]
    rng = random.Random(7)
    env = {"ALBEF_RELOAD_INTERVAL_S": "0.2"}

    def query(srv: ServerProcess) -> dict:
        r = httpx.post(f"{srv.url}/v1/search/images", json={"text": text, "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    # 1: killed while loading (a random moment after start), then restarted
    srv = ServerProcess(index_dir, env=env).start()
    time.sleep(rng.uniform(0.2, 2.0))
    srv.kill()
    srv = ServerProcess(index_dir, env=env).start()
    assert srv.wait_ready()["index_version"] == "000001"
    ref1 = reference_answers(index_dir, "000001", tiny_bundle, [text], k=5, rerank_k=32)[text]
    assert same_answer(answer(query(srv)), ref1)
    # 2: killed while serving, with a request in flight
    with httpx.Client(timeout=60) as c:
        outcome: list[object] = []
        t = threading.Thread(target=lambda: outcome.append(_try(c, srv.url, text)), daemon=True)
        t.start()
        time.sleep(rng.uniform(0.0, 0.3))
        srv.kill()
        t.join(timeout=60)
    assert outcome and outcome[0] in (200, "transport error")  # answered, or cut off; never a wrong answer
    # 3: a version is published while the service is down; the restarted service serves it
    new = make_folder(tmp_path / "new", 3, seed0=900)
    assert (
        cli_main(
            [
                "index",
                "add",
                "--index",
                str(index_dir),
                "--model",
                str(tiny_bundle),
                "--threads",
                "1",
                "--workers",
                "1",
                "--no-progress",
                str(new),
            ]
        )
        == 0
    )
    srv = ServerProcess(index_dir, env=env).start()
    try:
        assert srv.wait_ready()["index_version"] == "000002"
        body = query(srv)
        assert body["index_version"] == "000002"
        info = httpx.get(f"{srv.url}/v1/index", timeout=30).json()
        assert info["version"] == "000002" and info["counts"]["image"] == 40 + 3
        ref2 = reference_answers(index_dir, "000002", tiny_bundle, [text], k=5, rerank_k=32)[text]
        assert same_answer(answer(body), ref2)
    finally:
        srv.kill()


def _try(c: httpx.Client, url: str, text: str) -> object:
    try:
        return c.post(f"{url}/v1/search/images", json={"text": text, "k": 5}).status_code
    except httpx.HTTPError:
        return "transport error"
