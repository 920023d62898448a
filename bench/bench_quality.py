"""Does ITM re-ranking fix what vector search gets wrong? Measured through the HTTP API, on a fresh seed.

Steps, all on a synthetic split the model never saw (``albef data synth --seed SEED``, a seed used for nothing
else; the shipped model trains on seed 0 and was tuned on seed 0's val split):

1. export the checkpoint to an ONNX bundle (fp32) and index the split's test images and captions;
2. start a real ``albef serve`` on a loopback port and query it with :mod:`albef.client`, as a user would:
   - text -> image: every test caption as a query text, ``rerank`` off (ITC alone) and on (ITC + ITM, ``k``);
   - image -> text: every test image uploaded, the same two ways;
3. score the answers by the generator's semantics (:mod:`albef.model.data.truth`): caption-truth P@1 / P@5
   (a hit is a result the caption is true of) and the official R@1 (the annotated image / one of the image's
   own captions), from the item ids the API returned;
4. the compositional swap suite on the same split with ``albef eval`` (it is a choice among a group's images,
   not a search, so it is scored from the evaluator's score matrices of the same bundle's model).

Writes ``bench/results/quality.json`` with every figure, the seeds and the command.

    python bench/bench_quality.py [--checkpoint model/weights/albef-tiny-synth] [--seed 20261202]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench folder, when imported
from bench_service import Server  # noqa: E402
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FRESH_SEED = 20261202  # used for this benchmark only: never trained or tuned on


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(work: Path, checkpoint: Path, seed: int, images: int, size: int) -> tuple[Path, Path, Path]:
    from albef.index.builder import BuildOptions, build
    from albef.model.data.synth import generate
    from albef.model.export import export_bundle
    from albef.model.factory import create_model
    from albef.model.runtime import Bundle

    data = work / "data"
    generate(data, images, seed=seed, size=size, progress=False)
    bundle = work / "bundle"
    export_bundle(
        create_model(None, checkpoint), bundle, variants=["fp32"], checkpoint=checkpoint, progress=False
    )
    index = work / "index"
    build(index, Bundle.load(bundle), [data / "test.json"], BuildOptions(progress=False))
    return data, bundle, index


def query_all(url: str, test: list[dict[str, Any]], data: Path, k: int, rerank_k: int) -> dict[str, Any]:
    """Every caption (t2i) and every image (i2t) of the test split, rerank off and on: returned ids in order."""
    from albef.client import Client

    out: dict[str, Any] = {"t2i": {False: [], True: []}, "i2t": {False: [], True: []}, "items": {}}
    with Client(url, timeout=60) as client:

        def record(hits: list[Any]) -> list[int]:
            for h in hits:
                out["items"][h.id] = h.metadata.model_dump()
            return [h.id for h in hits]

        for rerank in (False, True):
            for entry in test:
                for caption in entry["caption"]:
                    found = client.search_images(caption, k=k, rerank=rerank, rerank_k=rerank_k)
                    out["t2i"][rerank].append(record(found.results))
            for entry in test:  # the image uploaded as a user would
                found = client.search_texts(data / entry["image"], k=k, rerank=rerank, rerank_k=rerank_k)
                out["i2t"][rerank].append(record(found.results))
    return out


def score(answers: dict[str, Any], test: list[dict[str, Any]], data: Path) -> dict[str, Any]:
    """Caption-truth P@1/P@5 and the official R@1, ITC alone vs ITC + ITM, from the ids the API returned."""
    from albef.model.data.synth import TRUE, caption_truth, parse_caption, scene_from_record

    records = {str((data / r["image"]).resolve()): r for r in json.loads((data / "scenes.json").read_text())}
    by_sha = {_sha256(data / e["image"]): records[str((data / e["image"]).resolve())] for e in test}
    captions = [(c, e) for e in test for c in e["caption"]]
    items = answers["items"]

    def scene_of(item_id: int) -> Any:
        return scene_from_record(by_sha[items[item_id]["sha256"]])

    def true_of(caption: str, scene: Any) -> bool:
        return caption_truth(parse_caption(caption), scene) == TRUE

    result: dict[str, Any] = {}
    for rerank, name in ((False, "itc"), (True, "itm")):
        t2i = answers["t2i"][rerank]
        i2t = answers["i2t"][rerank]
        p1_t = [true_of(c, scene_of(ids[0])) for (c, _), ids in zip(captions, t2i, strict=True)]
        p5_t = [
            np.mean([true_of(c, scene_of(i)) for i in ids[:5]])
            for (c, _), ids in zip(captions, t2i, strict=True)
        ]
        r1_t = [
            by_sha[items[ids[0]]["sha256"]]["image"] == e["image"]
            for (_, e), ids in zip(captions, t2i, strict=True)
        ]
        scenes = [scene_from_record(records[str((data / e["image"]).resolve())]) for e in test]
        p1_i = [true_of(items[ids[0]]["caption"], s) for s, ids in zip(scenes, i2t, strict=True)]
        p5_i = [
            np.mean([true_of(items[i]["caption"], s) for i in ids[:5]])
            for s, ids in zip(scenes, i2t, strict=True)
        ]
        r1_i = [items[ids[0]]["caption"] in e["caption"] for e, ids in zip(test, i2t, strict=True)]
        result[name] = {
            "t2i_truth_p1": round(100 * float(np.mean(p1_t)), 2),
            "t2i_truth_p5": round(100 * float(np.mean(p5_t)), 2),
            "i2t_truth_p1": round(100 * float(np.mean(p1_i)), 2),
            "i2t_truth_p5": round(100 * float(np.mean(p5_i)), 2),
            "t2i_r1": round(100 * float(np.mean(r1_t)), 2),
            "i2t_r1": round(100 * float(np.mean(r1_i)), 2),
        }
    itc, itm = result["itc"], result["itm"]
    result["lift"] = {key: round(itm[key] - itc[key], 2) for key in itc}
    result["queries"] = {"t2i": len(captions), "i2t": len(test)}
    return result


def offline_eval(checkpoint: Path, data: Path, k_test: int) -> dict[str, Any]:
    """``albef eval`` on the same split: the swap suite, and the evaluator's own truth figures beside the API's."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.truth import load_truth
    from albef.model.factory import create_model
    from albef.model.text import AlbefTokenizer, default_vocab_path
    from albef.model.train.evaluate import evaluate

    eval_set = load_eval_set(data / "test.json")
    model = create_model(None, checkpoint).float()
    report = evaluate(
        model,
        eval_set,
        AlbefTokenizer.from_vocab(default_vocab_path()),
        k_test,
        progress=False,
        truth=load_truth(data / "test.json", eval_set.images, eval_set.texts),
    )
    return {"truth": report["truth"], "official": {"itc": report["itc"], "itm": report["itm"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "model" / "weights" / "albef-tiny-synth")
    ap.add_argument("--seed", type=int, default=FRESH_SEED)
    ap.add_argument(
        "--images", type=int, default=3000, help="images generated (about 10%% form the test split)"
    )
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument(
        "--k", type=int, default=16, help="results per query (= rerank_k: the re-ranked short-list)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        t0 = time.perf_counter()
        data, bundle, index = prepare(work, args.checkpoint, args.seed, args.images, args.size)
        test = json.loads((data / "test.json").read_text())
        server = Server(index, bundle, {"ALBEF_DEFAULT_RERANK_K": str(args.k)})
        try:
            answers = query_all(server.url, test, data, args.k, args.k)
        finally:
            server.stop()
        api = score(answers, test, data)
        offline = offline_eval(args.checkpoint, data, args.k)
        result = {
            "checkpoint": str(args.checkpoint.resolve().relative_to(ROOT))
            if args.checkpoint.resolve().is_relative_to(ROOT)
            else str(args.checkpoint),
            "data": {
                "seed": args.seed,
                "images": args.images,
                "size": args.size,
                "split": "test",
                "test_images": len(test),
                "why": "a seed used for this benchmark only",
            },
            "k": args.k,
            "rerank_k": args.k,
            "api": api,
            "albef_eval": offline,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_result(args.out, result)
        print(json.dumps({"api": api, "albef_eval": offline}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
