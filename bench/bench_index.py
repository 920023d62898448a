"""Index benchmark: build throughput, re-rank feature storage, and FAISS index types at 100k / 1M vectors.

Writes bench/results/index.json with:

- ``encoder``: raw throughput of the bundle (images/s on preprocessed pixels, texts/s on token ids);
- ``build``: `albef index build` throughput on the synthetic dataset (decode + hash + encode + shards +
  publish), items/s and images/s, beside the raw encoder figures;
- ``rerank``: R@1 on the synthetic test split after ITM re-ranking of the ITC top-k, with image token features
  stored fp16 vs int8 (and text features stored as fp16 tokens vs ids re-encoded at query time), the ITM logit
  differences, per-query fetch cost, and bytes per item of each layout;
- ``ann``: for N = 100k and 1M clustered 256-d vectors, per index type: build seconds, tuned search parameter,
  recall@10 against exact search, ms/query single and in batches of 64, file bytes; plus the chooser's pick
  for several memory budgets. For an index with lossy codes (IVF-PQ) ``recall_at_10`` and the latencies are
  the re-scored search the reader serves (``ceil(factor * 10)`` candidates scored exactly from a memory-mapped
  ``.npy`` of the vectors, as the reader maps a segment's ``<kind>_emb.npy``; the factor tuned as a build
  tunes it), ``recall_at_10_codes`` and ``*_codes`` latencies are the codes' own order without re-scoring,
  and ``rescore_curve`` gives recall and latency for every factor at the tuned nprobe. The vectors are model embeddings (image and caption ITC vectors of the
  synthetic set) mean-centred, lifted to 256-d by a random orthonormal map and jittered with noise: clustered
  like real embeddings, not uniform random vectors.

Usage (bounded to about 10 minutes on 2 idle cores; ``--skip-hnsw-1m`` saves about 3-6 minutes)::

    python bench/bench_index.py [--bundle DIR] [--synth-images 600] [--sizes 100000,1000000] [--skip-hnsw-1m]

The re-scored IVF-PQ figures alone (issue 17, part 4; about 6 minutes on 2 busy cores)::

    python bench/bench_index.py --parts ann --sizes 100000,1000000 --only-factories "IVF1024,PQ32;IVF4096,PQ128"

Without ``--bundle`` it exports albef-tiny (the trained checkpoint in model/weights/albef-tiny-synth if
present, else random weights, seed 0) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def get_bundle(path: str | None, tmp: Path) -> tuple[Path, str]:
    if path:
        return Path(path), "given"
    import torch

    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    trained = ROOT / "model" / "weights" / "albef-tiny-synth"
    torch.manual_seed(0)
    if (trained / "config.json").is_file():
        model, what = create_model(None, trained), f"trained ({trained.relative_to(ROOT)})"
    else:
        model, what = create_model("albef-tiny"), "albef-tiny random weights (seed 0)"
    out = tmp / "bundle"
    export_bundle(model, out, variants=["fp32"], progress=False)
    return out, what


def median_rate(fn: Any, n_items: int, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_items / float(np.median(times))


def bench_encoder(bundle: Any, images: list[Path], captions: list[str]) -> dict[str, Any]:
    pix = bundle.preprocess(images[:64])
    ids, mask = bundle.tokenize(captions[:256])

    def run_images() -> None:
        for a in range(0, len(pix), 16):
            bundle.encode_pixels(pix[a : a + 16])

    def run_texts() -> None:
        for a in range(0, len(ids), 64):
            bundle.encode_ids(ids[a : a + 64], mask[a : a + 64])

    run_images()
    run_texts()  # warm-up
    return {
        "images_per_s": round(median_rate(run_images, len(pix)), 1),
        "image_batch": 16,
        "texts_per_s": round(median_rate(run_texts, len(ids)), 1),
        "text_batch": 64,
        "note": "pixels already decoded/preprocessed, token ids already computed",
    }


def bench_build(bundle: Any, synth: Path, tmp: Path) -> dict[str, Any]:
    from albef.index import builder
    from albef.index.builder import BuildOptions

    out: dict[str, Any] = {}
    for workers in (4, 1):
        idx = tmp / f"build-w{workers}"
        t0 = time.perf_counter()
        res = builder.build(
            idx,
            bundle,
            [synth / "train.json", synth / "val.json", synth / "test.json"],
            BuildOptions(workers=workers, progress=False),
        )
        wall = time.perf_counter() - t0
        rep = res.report
        n_img, n_txt = rep["images"]["indexed"], rep["texts"]["indexed"]
        out[f"workers_{workers}"] = {
            "images": n_img,
            "texts": n_txt,
            "wall_s": round(wall, 2),
            "encode_s": rep["seconds"]["encode"],
            "publish_s": rep["seconds"]["publish"],
            "items_per_s": round((n_img + n_txt) / wall, 1),
            "encode_items_per_s": rep["throughput"]["items_per_s"],
            "bytes_per_item": res.manifest["bytes_per_item"],
        }
        if workers == 1:
            shutil.rmtree(idx)
    out["index_dir"] = str(tmp / "build-w4")
    return out


def recall_at_1(pred_top1: list[int], gts: list[set[int]]) -> float:
    return round(100.0 * float(np.mean([p in g for p, g in zip(pred_top1, gts, strict=True)])), 2)


def bench_rerank(bundle: Any, synth: Path, tmp: Path, k: int = 16) -> dict[str, Any]:
    """R@1 after ITM re-ranking with fp16 vs int8 image tokens, and text tokens vs ids, on the test split."""
    from albef.index import builder
    from albef.index.builder import BuildOptions
    from albef.index.reader import IndexReader

    layouts = {"fp16+tokens": ("fp16", "tokens"), "int8+ids": ("int8", "ids")}
    readers = {}
    for name, (dt, tf) in layouts.items():
        d = tmp / f"rerank-{name.replace('+', '-')}"
        builder.build(
            d, bundle, [synth / "test.json"], BuildOptions(token_dtype=dt, text_features=tf, progress=False)
        )
        readers[name] = IndexReader.open(d, encoder=bundle)
    ref = readers["fp16+tokens"]
    items = ref.items(range(ref.manifest["next_id"]))
    img_ids = [it["id"] for it in items if it["kind"] == "image"]
    txt = [it for it in items if it["kind"] == "text"]
    gt_t2i = [{t["image_id"]} for t in txt]
    gt_i2t = [{t["id"] for t in txt if t["image_id"] == i} for i in img_ids]
    temb = np.stack([ref.vector("text", t["id"]) for t in txt])
    iemb = np.stack([ref.vector("image", i) for i in img_ids])
    _, cand_t2i = ref.search("image", temb, k)
    _, cand_i2t = ref.search("text", iemb, k)
    out: dict[str, Any] = {
        "k": k,
        "images": len(img_ids),
        "texts": len(txt),
        "itc_only": {
            "t2i_r1": recall_at_1(cand_t2i[:, 0].tolist(), gt_t2i),
            "i2t_r1": recall_at_1(cand_i2t[:, 0].tolist(), gt_i2t),
        },
    }
    logits: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, r in readers.items():
        lt2i, li2t = [], []
        t_img, t_txt = [], []
        for j, t in enumerate(txt):
            cands = cand_t2i[j][cand_t2i[j] >= 0]
            t0 = time.perf_counter()
            itok = r.image_tokens(cands)
            t_img.append(time.perf_counter() - t0)
            ttok, tmask = r.text_features([t["id"]])
            lt2i.append(
                bundle.itm_scores(np.repeat(ttok, len(cands), 0), np.repeat(tmask, len(cands), 0), itok)[:, 1]
            )
        for j, i in enumerate(img_ids):
            cands = cand_i2t[j][cand_i2t[j] >= 0]
            t0 = time.perf_counter()
            ttok, tmask = r.text_features(cands)
            t_txt.append(time.perf_counter() - t0)
            kv = bundle.image_kv(r.image_tokens([i]))
            li2t.append(bundle.itm_scores_for_image(kv, ttok, tmask)[:, 1])
        logits[name] = {"t2i": lt2i, "i2t": li2t}
        top_t2i = [int(c[c >= 0][np.argmax(s)]) for c, s in zip(cand_t2i, lt2i, strict=True)]
        top_i2t = [int(c[c >= 0][np.argmax(s)]) for c, s in zip(cand_i2t, li2t, strict=True)]
        bpi = r.manifest["bytes_per_item"]
        out[name] = {
            "t2i_r1": recall_at_1(top_t2i, gt_t2i),
            "i2t_r1": recall_at_1(top_i2t, gt_i2t),
            "image_tokens_fetch_ms_per_query": round(1000 * float(np.median(t_img)), 3),
            "text_features_ms_per_query": round(1000 * float(np.median(t_txt)), 3),
            "bytes_per_image": bpi["image"]["total"],
            "bytes_per_text": bpi["text"]["total"],
            "image_token_bytes": bpi["image"]["tokens"],
            "text_token_bytes": bpi["text"].get("tokens", 0),
            "_top": (top_t2i, top_i2t),
        }
    a, b = out["fp16+tokens"], out["int8+ids"]
    diff = {
        d: np.concatenate(
            [x - y for x, y in zip(logits["fp16+tokens"][d], logits["int8+ids"][d], strict=True)]
        )
        for d in ("t2i", "i2t")
    }
    out["int8_vs_fp16"] = {
        "t2i_same_top1": round(
            float(np.mean([x == y for x, y in zip(a["_top"][0], b["_top"][0], strict=True)])), 4
        ),
        "i2t_same_top1": round(
            float(np.mean([x == y for x, y in zip(a["_top"][1], b["_top"][1], strict=True)])), 4
        ),
        "itm_logit_max_abs_diff": round(float(max(np.abs(v).max() for v in diff.values())), 5),
        "itm_logit_mean_abs_diff": round(float(np.mean(np.abs(np.concatenate(list(diff.values()))))), 6),
        "note": "int8+ids differs from fp16+tokens in both image tokens (int8) and text features (ids re-encoded "
        "exactly in fp32 vs stored fp16)",
    }
    for name in layouts:
        out[name].pop("_top")
    # Query-time cost of ids for image->text: re-encoding k candidate texts
    ids_r = readers["int8+ids"]
    cand = [int(c) for c in cand_i2t[0][:k]]
    tid, tm = ids_r.text_token_ids(cand)
    enc = median_rate(lambda: bundle.encode_ids(tid, tm), 1, reps=5)
    out["text_ids_reencode_ms_per_query"] = round(1000.0 / enc, 3)
    tok, tmask = readers["fp16+tokens"].text_features(cand)
    kv = bundle.image_kv(readers["fp16+tokens"].image_tokens([img_ids[0]]))
    itm = median_rate(lambda: bundle.itm_scores_for_image(kv, tok, tmask), 1, reps=5)
    out["itm_kv_ms_per_query"] = round(1000.0 / itm, 3)
    for r in readers.values():
        r.close()
    return out


def clustered_vectors(
    anchors: np.ndarray, n: int, dim: int = 256, noise: float = 0.3, seed: int = 0, neighbours: int = 8
) -> np.ndarray:
    """n unit vectors shaped like embedding data: the model's embeddings (anchors) are centred, whitened,
    normalised and lifted to ``dim`` by a random orthonormal map; each vector lies on the segment between an anchor and one
    of its nearest anchors (a continuous, low-dimensional structure) plus isotropic noise of norm ~``noise``."""
    rng = np.random.default_rng(seed)
    a = anchors - anchors.mean(0, keepdims=True)
    # PCA-whiten: a random (untrained) model puts ~99% of the variance in one direction, which would leave
    # nearly 1-D data; whitening keeps which items are near which but spreads them over all dimensions.
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    a = (a @ vt.T) / (s / np.sqrt(len(a)) + 1e-6)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    q, _ = np.linalg.qr(np.random.default_rng(1234).standard_normal((dim, a.shape[1])).astype(np.float32))
    lifted = (a @ q.T).astype(np.float32)
    nbr = np.argsort(-(lifted @ lifted.T), axis=1)[:, 1 : neighbours + 1]
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        i = rng.integers(0, len(lifted), m)
        j = nbr[i, rng.integers(0, neighbours, m)]
        w = rng.uniform(0.0, 1.0, (m, 1)).astype(np.float32)
        x = (1 - w) * lifted[i] + w * lifted[j]
        x += noise / np.sqrt(dim) * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def time_search(
    index: Any, q: np.ndarray, k: int = 10, factor: float | None = None, fetch: Any = None
) -> dict[str, float]:
    """ms per query, one query at a time (the service's case) and in batches of 64; with ``factor``: the
    re-scored search (:func:`albef.index.ann.search_rescored`) over ``fetch``."""
    from albef.index import ann

    def run(x: np.ndarray) -> None:
        if factor is None:
            ann.search(index, x, k)
        else:
            ann.search_rescored(index, x, k, factor, fetch)

    t0 = time.perf_counter()
    n_single = 30 if index.ntotal >= 500_000 else 100
    for row in q[:n_single]:
        run(row[None, :])
    single = (time.perf_counter() - t0) * 1000 / n_single
    t0 = time.perf_counter()
    for s in range(0, 256, 64):
        run(q[s : s + 64])
    batch = (time.perf_counter() - t0) * 1000 / 256
    return {"ms_per_query_single": round(single, 3), "ms_per_query_batch64": round(batch, 3)}


def rescored_figures(
    index: Any, tuned: dict[str, Any], q: np.ndarray, truth: np.ndarray, fetch: Any
) -> dict[str, Any]:
    """A lossy index at its tuned nprobe: recall@10 and latency re-scored (the tuned factor, and every factor
    of the grid), and without re-scoring (the codes' own order)."""
    from albef.index import ann

    factor = tuned["rescore"]["factor"]
    _, codes = ann.search(index, q, 10, tie_margin=0)
    _, found = ann.search_rescored(index, q, 10, factor, fetch)
    curve = []
    for f in ann.RESCORE_FACTORS:
        _, got = ann.search_rescored(index, q, 10, f, fetch)
        t = time_search(index, q, 10, f, fetch)
        curve.append(
            {
                "factor": f,
                "candidates": ann.candidates_for(10, f),
                "recall_at_10": round(ann.recall_at(got, truth), 4),
                "ms_per_query_single": t["ms_per_query_single"],
            }
        )
    plain = time_search(index, q)
    return {
        "rescore": tuned["rescore"],
        "recall_at_10": round(ann.recall_at(found, truth), 4),
        "recall_at_10_codes": round(ann.recall_at(codes, truth), 4),
        **time_search(index, q, 10, factor, fetch),
        "ms_per_query_single_codes": plain["ms_per_query_single"],
        "ms_per_query_batch64_codes": plain["ms_per_query_batch64"],
        "rescore_curve": curve,
        "rescore_vectors": "float32 .npy memory-mapped (np.load mmap_mode='r'), warm page cache",
    }


def bench_ann(
    anchors: np.ndarray, sizes: list[int], skip_hnsw_1m: bool, tmp: Path, only: set[str] | None = None
) -> dict[str, Any]:
    from albef.index import ann

    out: dict[str, Any] = {
        "dim": 256,
        "data": "synthetic-set ITC embeddings (images + captions) of the bundle, "
        "centred, PCA-whitened, normalised, lifted to 256-d by a random orthonormal map; points on segments between "
        "neighbouring embeddings + isotropic noise of norm 0.3; queries are other draws of "
        "the same process (seed 2)",
        "k": 10,
        "target_recall": 0.95,
        "sizes": {},
    }
    for n in sizes:
        t0 = time.perf_counter()
        x = clustered_vectors(anchors, n, seed=1)
        q = clustered_vectors(anchors, 1000, seed=2)
        ids = np.arange(n, dtype=np.int64)
        gen_s = time.perf_counter() - t0
        vec_path = (
            tmp / f"vectors-{n}.npy"
        )  # what re-scoring reads, memory-mapped as a segment's <kind>_emb.npy
        np.save(vec_path, x)
        fetch = ann.fetch_rows(np.load(vec_path, mmap_mode="r"), ids)
        entry: dict[str, Any] = {
            "n": n,
            "generate_s": round(gen_s, 1),
            "load_avg_start": load_avg(),
            "chooser": {b: ann.choose(n, 256, b).factory for b in ("4G", "1G", "256M", "64M")},
            "indexes": {},
        }
        t0 = time.perf_counter()
        truth = ids[ann.exact_topk(x, q, 10)]
        entry["exact_topk_1000_queries_s"] = round(time.perf_counter() - t0, 2)
        nl = ann.nlist_for(n)
        factories = ["Flat", entry["chooser"]["4G"], entry["chooser"]["1G"], entry["chooser"]["256M"]]
        if n <= 200_000:
            factories += [f"IVF{nl},Flat", f"IVF{nl},PQ32"]
        seen: list[str] = []
        for f in factories:
            if f in seen:
                continue
            seen.append(f)
            if only and f not in only:
                continue
            if f.startswith("HNSW") and n >= 1_000_000 and skip_hnsw_1m:
                entry["indexes"][f] = {"skipped": "--skip-hnsw-1m"}
                continue
            t0 = time.perf_counter()
            index = ann.build(x, ids, f)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            tuned = ann.tune(index, f, x, ids, queries=q, n_queries=1000, target_recall=0.95, fetch=fetch)
            tune_s = time.perf_counter() - t0
            path = tmp / "bench.faiss"
            ann.write(index, path)
            if ann.lossy(f):
                figures = rescored_figures(index, tuned, q, truth, fetch)
            else:
                _, found = ann.search(index, q, 10, tie_margin=0)
                figures = {"recall_at_10": round(ann.recall_at(found, truth), 4), **time_search(index, q)}
            entry["indexes"][f] = {
                "build_s": round(build_s, 1),
                "tune_s": round(tune_s, 1),
                "params": tuned["params"],
                **figures,
                "tuning": tuned["tuning"],
                "file_bytes": path.stat().st_size,
                "bytes_per_vector": round(path.stat().st_size / n, 1),
                "est_bytes": ann.estimate_bytes(f, n, 256),
                "load_avg": load_avg(),
            }
            path.unlink()
            del index
            e = entry["indexes"][f]
            codes = f" (codes alone {e['recall_at_10_codes']})" if "recall_at_10_codes" in e else ""
            print(
                f"  n={n} {f}: {e['recall_at_10']} recall@10{codes}, "
                f"{e['ms_per_query_single']} ms/q, build {build_s:.1f}s",
                flush=True,
            )
        entry["load_avg_end"] = load_avg()
        out["sizes"][str(n)] = entry
        del x, fetch
        vec_path.unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--synth-images", type=int, default=600)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--skip-hnsw-1m", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "index.json")
    p.add_argument("--parts", default="encoder,build,rerank,ann")
    p.add_argument(
        "--only-factories",
        default=None,
        help="measure only these index types (';'-separated); the others keep their earlier figures",
    )
    args = p.parse_args()
    parts = set(args.parts.split(","))
    from albef.log import setup_logging

    setup_logging("WARNING")
    from albef.model.data.synth import generate
    from albef.model.runtime import Bundle

    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_start": load_avg(),
            "note": "2 cores shared with other jobs; see load averages",
        }
    }
    if args.out.is_file():  # keep parts not rerun
        results = {**json.loads(args.out.read_text()), **results}
    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        bundle_dir, what = get_bundle(args.bundle, tmp)
        bundle = Bundle.load(bundle_dir)
        results["bundle"] = {
            "what": what,
            "id": bundle.bundle_id,
            "model": bundle.config.name,
            "embed_dim": bundle.embed_dim,
            "image_tokens_shape": list(bundle.image_tokens_shape),
        }
        synth = tmp / "synth"
        counts = generate(synth, args.synth_images, seed=0, size=128, progress=False)
        results["synthetic"] = {"images": args.synth_images, "size": 128, "counts": counts}
        anns = json.loads((synth / "train.json").read_text())
        captions = [a["caption"] for a in anns]
        images = sorted((synth / "images").glob("*.png"))
        if "encoder" in parts:
            print("encoder ...", flush=True)
            results["encoder"] = bench_encoder(bundle, images, captions)
        if "build" in parts:
            print("build ...", flush=True)
            results["build"] = bench_build(bundle, synth, tmp)
            results["build"]["load_avg"] = load_avg()
        if "rerank" in parts:
            print("rerank ...", flush=True)
            results["rerank"] = bench_rerank(bundle, synth, tmp)
        if "ann" in parts:
            print("ann ...", flush=True)
            from albef.index.reader import IndexReader

            src = tmp / "build-w4"
            if not src.is_dir():
                from albef.index import builder
                from albef.index.builder import BuildOptions

                builder.build(
                    src,
                    bundle,
                    [synth / "train.json", synth / "val.json", synth / "test.json"],
                    BuildOptions(progress=False),
                )
            with IndexReader.open(src) as r:
                its = r.items(range(r.manifest["next_id"]))
                anchors = np.stack([r.vector(it["kind"], it["id"]) for it in its])
            sizes = [int(s) for s in args.sizes.split(",") if s]
            only = set(args.only_factories.split(";")) if args.only_factories else None
            new = bench_ann(anchors, sizes, args.skip_hnsw_1m, tmp, only)
            old_sizes = (results.get("ann") or {}).get("sizes", {})
            for key, entry in new["sizes"].items():  # keep figures of index types skipped in this run
                old = old_sizes.get(key, {}).get("indexes", {})
                for f, e in old.items():
                    if "skipped" in entry["indexes"].get(f, {"skipped": True}) and "skipped" not in e:
                        entry["indexes"][f] = e
            new["sizes"] = {**old_sizes, **new["sizes"]}  # sizes not rerun keep their earlier figures
            results["ann"] = new
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["load_avg_end"] = load_avg()
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results.setdefault("commands", [])
    results["commands"] = [
        *results["commands"][-4:],
        "python bench/bench_index.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
            for k, v in vars(args).items()
            if k != "out" and v not in (None, False)
        ),
    ]
    results["command"] = results["commands"][-1]
    write_result(args.out, results)
    print(f"wrote {args.out} in {results['total_s']} s")


if __name__ == "__main__":
    main()
