"""Index builds on a real Ray cluster (issue 17): a head node and a worker node started with ``ray start`` as
separate processes on this machine. A build with an encoder actor killed mid-way, and an add whose driver is
killed and then resumed, each end equal to a local build of the same sources (vectors bit for bit, metadata rows,
token features, search results); errors of the ``--ray`` options; Ray only in the ``cluster`` extra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomllib

from albef.cli import main as cli_main
from albef.index import builder
from albef.index.builder import BuildOptions
from albef.index.errors import IndexError_
from albef.index.ray_build import RayOptions, actor_bundle, check_resources, default_actors
from albef.index.reader import current_version
from tests.helpers import REPO, SLOW_SHARDS
from tests.helpers.index import assert_same_snapshot, make_folder, snapshot
from tests.helpers.ray_cluster import LocalCluster, local_cluster

pytestmark = pytest.mark.slow

SLOW_RAY = REPO / "tests" / "helpers" / "slow_ray.py"
OPTS = dict(batch_size=2, shard_size=24, text_batch_size=16, text_shard_size=100)
ARGS = [
    "--batch-size",
    "2",
    "--shard-size",
    "24",
    "--text-batch-size",
    "16",
    "--text-shard-size",
    "100",
    "--threads",
    "1",
    "--no-progress",
    "--json",
]


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    with local_cluster(head_cpus=2, worker_cpus=1) as cluster:
        yield cluster


def _driver_env(cluster: LocalCluster) -> dict[str, str]:
    return {**cluster.env, "ALBEF_LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO)}


def _result(stdout: str) -> dict[str, Any]:
    """The command's --json line. (tests/helpers/slow_ray.py keeps its Ray connection after the command,
    so Ray's driver messages may reach stdout after the encoder has given it back.)"""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _with_duplicates(src: Path) -> Path:
    """Duplicate bytes within one shard and across shards, and an image that cannot be decoded."""
    shutil.copyfile(src / "part0" / "img002.png", src / "part0" / "img002b.png")  # next to its original
    shutil.copyfile(src / "part0" / "img000.png", src / "part1" / "zz-dup.png")  # shards after it
    (src / "part1" / "zz-broken.png").write_bytes(b"not a png")
    return src


def test_killed_encoder_actor_is_replaced_and_the_build_equals_a_local_one(
    ray_cluster: LocalCluster, index_bundle, index_bundle_dir: Path, tmp_path: Path
) -> None:
    src = _with_duplicates(make_folder(tmp_path / "src", 240, seed0=1000))
    ref = tmp_path / "local"
    local = builder.build(ref, index_bundle, [src], BuildOptions(**OPTS, progress=False))

    out = tmp_path / "ray"
    cmd = [sys.executable, str(SLOW_RAY), "0.05", "index", "build", "--model", str(index_bundle_dir)]
    cmd += ["--out", str(out), "--ray", ray_cluster.address, *ARGS, str(src)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_driver_env(ray_cluster)
    )
    killed: list[int] = []
    before: set[int] = set()
    err: list[str] = []

    def watch() -> None:  # the driver logs each committed shard with the pids of the actors that encoded it
        for line in proc.stderr:
            err.append(line)
            rec = json.loads(line) if line.startswith("{") else {}
            if not killed and rec.get("msg") == "shard committed" and rec.get("actor_pids"):
                before.update(rec["actor_pids"])
                pid = rec["actor_pids"][0]
                assert ray_cluster.owns(pid), "the actor is not a process of the test's cluster"
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        stdout = proc.stdout.read()
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(err)[-4000:]
    assert killed, "no shard was committed while the build ran"
    report = _result(stdout)["report"]
    ex = report["executor"]
    assert ex["name"] == "ray" and ex["nodes"] == 2 and ex["actors"] == 2
    actors = {int(pid) for pid in ex["per_actor"]}
    assert killed[0] in actors and actors - before, f"no replacement actor encoded anything: {ex}"
    for key in ("images", "texts", "failed", "duplicate_images", "shards"):
        assert report[key] == local.report[key], key
    assert report["images"] == {"planned": 243, "indexed": 240, "duplicates": 2, "failed": 1}
    assert_same_snapshot(snapshot(ref), snapshot(out))


def test_killed_driver_leaves_the_index_intact_and_resume_local_or_on_ray_equals_a_local_add(
    ray_cluster: LocalCluster, index_bundle, index_bundle_dir: Path, tmp_path: Path
) -> None:
    base_src = make_folder(tmp_path / "a", 30, seed0=3000)
    ref, out = tmp_path / "local", tmp_path / "ray"
    builder.build(ref, index_bundle, [base_src], BuildOptions(**OPTS, progress=False))
    shutil.copytree(ref, out)
    base = snapshot(out)
    src = _with_duplicates(make_folder(tmp_path / "b", 200, seed0=4000))
    shutil.copyfile(base_src / "part1" / "img001.png", src / "part1" / "img150-indexed.png")  # in the index
    builder.add(ref, index_bundle, [src], BuildOptions(**OPTS, progress=False))

    add = [
        "index",
        "add",
        "--index",
        str(out),
        "--model",
        str(index_bundle_dir),
        "--ray",
        ray_cluster.address,
    ]
    cmd = [sys.executable, str(SLOW_SHARDS), "0.5", *add, *ARGS, str(src)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_driver_env(ray_cluster)
    )
    shards = out / "work" / "pending" / "shards"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if shards.is_dir() and len(list(shards.glob("img-*.npz"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the add ended before its driver could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    committed = sorted(p.name for p in shards.glob("img-*.npz"))
    assert 2 <= len(committed) < 9 and committed == [f"img-{i:05d}.npz" for i in range(len(committed))]
    assert current_version(out) == "000001"
    assert_same_snapshot(base, snapshot(out))  # the published index is as it was

    # the shards a Ray driver left are a local build's: a local --resume finishes them too (on a copy)
    copy = tmp_path / "ray-resumed-locally"
    shutil.copytree(out, copy)
    local_add = ["index", "add", "--index", str(copy), "--model", str(index_bundle_dir), *ARGS]
    assert cli_main([*local_add, "--resume", str(src)]) == 0
    assert_same_snapshot(snapshot(ref), snapshot(copy))

    resume = subprocess.run(
        [sys.executable, "-m", "albef", *add, *ARGS, "--resume", str(src)],
        capture_output=True,
        text=True,
        env=_driver_env(ray_cluster),
        timeout=240,
    )
    assert resume.returncode == 0, resume.stderr[-4000:]
    report = json.loads(resume.stdout)["report"]  # stdout is the one JSON object: Ray's messages go to stderr
    assert report["resumed"] is True and report["executor"]["name"] == "ray"
    assert report["items_done_before_this_run"] >= 2 * OPTS["shard_size"]
    assert report["images"] == {"planned": 204, "indexed": 200, "duplicates": 3, "failed": 1}
    assert_same_snapshot(snapshot(ref), snapshot(out))
    assert not (out / "work" / "pending").exists()


def test_ray_option_errors_name_the_fix(
    index_bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = make_folder(tmp_path / "src", 2)
    build = ["index", "build", "--model", str(index_bundle_dir), "--out", str(tmp_path / "idx"), str(src)]
    assert cli_main([*build, "--ray-actors", "2"]) == 2
    assert "--ray-actors and --ray-gpus need --ray ADDRESS" in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t0 = time.monotonic()
    assert cli_main([*build, "--ray", f"127.0.0.1:{closed}"]) == 1
    assert f"no Ray cluster at 127.0.0.1:{closed}" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    assert cli_main([*build, "--ray", "auto", "--ray-actors", "0"]) == 1
    assert "--ray-actors must be at least 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as in an install without the extra
    assert cli_main([*build, "--ray", "auto"]) == 1
    assert "pip install 'albef-search[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_a_pool_the_cluster_cannot_hold_is_refused_not_waited_for() -> None:
    """With every CPU held by an actor the decode tasks never run and Ray waits without end: refused."""
    assert default_actors({"CPU": 3.0}, RayOptions()) == 2  # one CPU left to decoding
    assert default_actors({"CPU": 9.0}, RayOptions(threads=4)) == 2
    assert default_actors({"CPU": 1.0}, RayOptions()) == 1
    assert default_actors({"CPU": 8.0, "GPU": 2.0}, RayOptions(gpus_per_actor=0.5)) == 4
    check_resources({"CPU": 5.0}, 2, RayOptions(threads=2))
    with pytest.raises(IndexError_, match="need 5 CPUs; the cluster has 4: pass fewer --ray-actors"):
        check_resources({"CPU": 4.0}, 2, RayOptions(threads=2))
    with pytest.raises(IndexError_, match="need 1 GPUs; the cluster has 0"):
        check_resources({"CPU": 8.0}, 1, RayOptions(gpus_per_actor=1))


def test_a_gpu_actor_uses_cuda_where_onnx_runtime_has_it_else_the_cpu_bit_for_bit(
    index_bundle, index_bundle_dir: Path
) -> None:
    import numpy as np
    import onnxruntime as ort

    gpu = actor_bundle(str(index_bundle_dir), "fp32", 1, gpu=True)
    used = gpu.session("image_encoder").get_providers()[0]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert used == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    r = index_bundle.image_res
    pixels = np.random.default_rng(0).standard_normal((3, 3, r, r)).astype(np.float32)
    emb, tokens = gpu.encode_pixels(pixels)
    ref_emb, ref_tokens = index_bundle.encode_pixels(pixels)
    if cuda:
        assert np.allclose(emb, ref_emb, atol=1e-3) and np.allclose(tokens, ref_tokens, atol=1e-2)
    else:
        assert np.array_equal(emb, ref_emb) and np.array_equal(tokens, ref_tokens)


def test_ray_is_the_cluster_extra_and_the_test_extra_pulls_it_in() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("ray") for d in project["dependencies"])  # never in the serving install
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray[data]") for d in extras["cluster"])
    assert "albef-search[cluster]" in extras["test"]
