"""Index builds on Ray against local ones, and what the driver's publish costs at scale (docs/scaling.md).

1. ``build``: one synthetic gallery (``albef data synth``, 128 px PNGs with their captions) indexed by
   ``albef index build`` locally and with ``--ray`` on a two-node cluster of this machine (the tests' cluster:
   ``tests/helpers/ray_cluster.py``), with 1 and 2 encoder actors, each as a fresh command (the user's wall
   time: interpreter, imports, Ray connection, hashing, decoding, encoding, publish). ``overhead``: the same for
   a gallery of 16 images, i.e. what Ray costs before the first image.
2. ``faiss``: IVF training on the builder's training sample (163,840 vectors at most, ``albef.index.ann.build``)
   and ``add`` throughput, at several ``nlist`` to extrapolate to the index the chooser picks at 100M
   (IVF32768,PQ32 under 4G); exact top-10 of the tuning queries (500) over n vectors.
3. ``sqlite``: inserting metadata rows into a new version's database, and copying the parent's (every version
   starts as a copy of the previous one).

Usage: ``python bench/bench_ray.py [--images 2000] [--bundle DIR] [--parts build,faiss,sqlite]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
sys.path.insert(1, str(REPO))  # tests.helpers.ray_cluster
from common import write_result  # noqa: E402


def tiny_bundle(out: Path) -> Path:
    """The random albef-tiny (seed 0) exported as the index tests' bundle is."""
    import torch

    from albef.model.checkpoint import save_albef
    from albef.model.export import export_bundle
    from albef.model.factory import create_model
    from albef.model.text import default_vocab_path

    torch.manual_seed(0)
    ckpt = out / "ckpt"
    save_albef(create_model("albef-tiny"), ckpt, source={"init": "random", "seed": 0})
    bundle = out / "bundle"
    export_bundle(
        create_model(None, ckpt),
        bundle,
        variants=["fp32"],
        vocab=default_vocab_path(),
        checkpoint=ckpt,
        progress=False,
    )
    return bundle


def gallery(out: Path, images: int) -> list[Path]:
    from albef.model.data.synth import generate

    generate(out, images, 7, size=128, progress=False)
    return [out / f"{split}.json" for split in ("train", "val", "test")]


def index_build(
    bundle: Path, sources: list[Path], out: Path, extra: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "albef", "index", "build", "--model", str(bundle), "--out", str(out)]
    cmd += ["--no-progress", "--json", *extra, *map(str, sources)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ), timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    rep = res["report"]
    items = rep["images"]["indexed"] + rep["texts"]["indexed"]
    out_rec = {
        "args": extra,
        "wall_s": round(wall, 2),
        "items": items,
        "items_per_s_wall": round(items / wall, 1),
        "encode_s": rep["seconds"]["encode"],
        "publish_s": rep["seconds"]["publish"],
        "items_per_s_encode": rep["throughput"]["items_per_s"],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    ex = rep["executor"]
    if ex["name"] == "ray":
        out_rec["ray"] = {k: ex[k] for k in ("nodes", "actors", "hash_s", "encode_s") if k in ex}
        per = ex.get("per_actor", {})
        out_rec["ray"]["per_actor_items_per_encode_s"] = {
            pid: round(a["items"] / a["s"], 1) for pid, a in per.items() if a["s"] > 0
        }
    shutil.rmtree(out, ignore_errors=True)
    return out_rec


def bench_build(work: Path, bundle: Path, images: int) -> dict[str, Any]:
    from tests.helpers.ray_cluster import local_cluster

    sources = gallery(work / "synth", images)
    small = gallery(work / "small", 20)
    res: dict[str, Any] = {"images": images, "bundle": "albef-tiny (random, 96 px)"}
    res["local"] = index_build(bundle, sources, work / "local", [])
    res["local_threads1"] = index_build(bundle, sources, work / "local1", ["--threads", "1"])
    t0 = time.perf_counter()
    with local_cluster(head_cpus=2, worker_cpus=1) as cluster:
        res["cluster_start_s"] = round(time.perf_counter() - t0, 2)
        ray = ["--ray", cluster.address, "--threads", "1"]
        for actors in (1, 2):
            res[f"ray_{actors}_actors"] = index_build(
                bundle, sources, work / f"ray{actors}", [*ray, "--ray-actors", str(actors)], cluster.env
            )
        res["overhead_local_small"] = index_build(bundle, small, work / "small-local", [])
        res["overhead_ray_small"] = index_build(bundle, small, work / "small-ray", ray, cluster.env)
    return res


def bench_faiss(n_add: int = 200_000, d: int = 256) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(n_add, 163_840), d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict[str, Any] = {"d": d, "train_sample": 163_840, "threads": faiss.omp_get_max_threads()}
    for nlist in (1024, 4096):
        index = faiss.index_factory(d, f"IVF{nlist},PQ32", faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        t0 = time.perf_counter()
        index.train(x[:163_840])
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.add_with_ids(x[:n_add], np.arange(n_add, dtype=np.int64))
        add_s = time.perf_counter() - t0
        out[f"IVF{nlist},PQ32"] = {
            "train_s": round(train_s, 2),
            "add_vectors": n_add,
            "add_s": round(add_s, 2),
            "add_per_s": round(n_add / add_s),
        }
    q = x[:500]
    t0 = time.perf_counter()
    faiss.knn(q, x[:n_add], 10, metric=faiss.METRIC_INNER_PRODUCT)
    out["exact_top10_500_queries"] = {"n": n_add, "s": round(time.perf_counter() - t0, 2)}
    return out


def bench_sqlite(work: Path, n: int = 200_000) -> dict[str, Any]:
    from albef.index import metadata

    rows = [
        {
            "id": i,
            "kind": "image",
            "path": f"/data/gallery/part{i % 100}/image-{i:09d}.jpg",
            "caption": "a small red circle left of a large blue square",
            "width": 640,
            "height": 480,
            "sha256": f"{i:064x}",
            "metadata": {"source": "bench", "n": i},
            "image_id": None,
            "source": "/data/gallery/items.jsonl",
            "segment": "seg-000001",
            "row": i,
        }
        for i in range(n)
    ]
    db = work / "a.sqlite"
    t0 = time.perf_counter()
    conn = metadata.create(db)
    metadata.insert(conn, rows)
    conn.commit()
    conn.close()
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn = metadata.create(work / "b.sqlite", base=db)
    conn.close()
    copy_s = time.perf_counter() - t0
    size = db.stat().st_size
    return {
        "rows": n,
        "insert_s": round(insert_s, 2),
        "rows_per_s": round(n / insert_s),
        "bytes_per_row": round(size / n, 1),
        "copy_s": round(copy_s, 2),
        "copy_mb_per_s": round(size / 2**20 / copy_s, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder (default: export the random tiny)"
    )
    ap.add_argument("--parts", default="build,faiss,sqlite")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        if "build" in parts:
            bundle = args.bundle or tiny_bundle(work / "bundle")
            result["build"] = bench_build(work, bundle, args.images)
            print(json.dumps(result["build"], indent=1), flush=True)
        if "faiss" in parts:
            result["faiss"] = bench_faiss()
            print(json.dumps(result["faiss"], indent=1), flush=True)
        if "sqlite" in parts:
            result["sqlite"] = bench_sqlite(work)
            print(json.dumps(result["sqlite"], indent=1), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
