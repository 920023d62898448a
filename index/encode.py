"""Step 2 of a build/add: the plan's images and texts -> committed shards (``work/pending/shards``).

Images are read, hashed and decoded by a thread pool that runs ahead of the model (decoding overlaps ONNX
Runtime, which releases the GIL); the main thread sees them in plan order, drops content duplicates (sha256
of the bytes, against the index and everything before), batches the rest through the image encoder and
commits each finished shard atomically (``img-00007.npz``) with embeddings, token features and metadata
rows. Unreadable images are recorded in the shard and skipped. Shards and their batches are fixed by the
plan, so after a crash (even kill -9) encoding replays the committed shards' hashes and continues with the
first missing shard, producing the same ids, vectors and metadata as an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from albef import atomic
from albef.index.features import encode_tokens
from albef.index.options import BuildOptions, Encoder
from albef.model.image import ImageFormatError, open_image, upright


def shard_path(wdir: Path, kind: str, i: int) -> Path:
    return wdir / "shards" / f"{'img' if kind == 'image' else 'txt'}-{i:05d}.npz"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic.writing(path) as fh:
        np.savez(fh, **arrays)


def _read_image(path: str, bundle: Encoder, opts: BuildOptions) -> dict[str, Any]:
    """Runs in a worker thread: bytes -> sha256, upright size, pixels. Never raises."""
    try:
        if "://" in path:
            raise ValueError("remote URIs are not fetched by the index builder; download the file first")
        data = Path(path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        img = upright(open_image(data, opts.image_formats), opts.exif_transpose)
        img.load()
        width, height = img.size  # as the image is seen (after its EXIF orientation, unless official)
        pixels = bundle.preprocess([img], exif_transpose=False)[0]
        return {"sha256": sha, "width": width, "height": height, "pixels": pixels}
    except FileNotFoundError:
        return {"error": "missing: no such file"}
    except ImageFormatError as exc:
        return {"error": f"refused: {exc}"}
    except UnidentifiedImageError:
        return {"error": "unreadable: not an image or an unsupported format"}
    except Exception as exc:  # noqa: BLE001 - any unreadable input is reported and skipped
        return {"error": f"unreadable: {type(exc).__name__}: {exc}"}


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int
) -> Iterator[Any]:
    """pool.map with a bounded look-ahead (the reader never runs more than ``ahead`` items in front)."""
    it = iter(items)
    pending: deque[Future[Any]] = deque()
    for x in it:
        pending.append(pool.submit(fn, x))
        if len(pending) >= ahead:
            break
    while pending:
        fut = pending.popleft()
        nxt = next(it, _END)
        if nxt is not _END:
            pending.append(pool.submit(fn, nxt))
        yield fut.result()


_END = object()


def encode_images(
    wdir: Path,
    plan: dict[str, Any],
    bundle: Encoder,
    opts: BuildOptions,
    known: dict[str, int],
    bar: Any,
) -> None:
    """Encode the image shards not committed yet; ``known`` maps the index's image hashes to ids."""
    images = plan["images"]
    seen: dict[str, int] = {}  # sha -> plan index of the first occurrence in this build
    pending: list[int] = []
    for s in range(plan["n_image_shards"]):
        p = shard_path(wdir, "image", s)
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                for idx, sha in zip(z["plan_idx"].tolist(), z["sha256"].tolist(), strict=True):
                    seen.setdefault(sha, idx)
        else:
            pending.append(s)
    if not pending:
        return
    work = [
        (s, i)
        for s in pending
        for i in range(s * opts.shard_size, min(len(images), (s + 1) * opts.shard_size))
    ]
    ahead = 2 * opts.batch_size + 2 * opts.workers
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="albef-decode") as pool:
        stream = _ordered_map(
            pool, lambda si: (si[0], si[1], _read_image(images[si[1]]["path"], bundle, opts)), work, ahead
        )
        cur: int | None = None
        state: dict[str, Any] = {}

        def flush_batch() -> None:
            if not state["batch"]:
                return
            pixels = np.stack([b.pop("pixels") for b in state["batch"]])
            emb, tok = bundle.encode_pixels(pixels)
            stored, scales = encode_tokens(tok, opts.token_dtype)
            state["emb"].append(emb)
            state["tok"].append(stored)
            if scales is not None:
                state["scales"].append(scales)
            state["rows"].extend(state["batch"])
            bar.update(len(state["batch"]))
            state["batch"] = []

        def commit(shard: int) -> None:
            flush_batch()
            rows = state["rows"]
            n_tok, width = bundle.image_tokens_shape
            tok_dtype = np.float16 if opts.token_dtype == "fp16" else np.int8
            arrays = {
                "plan_idx": np.array([r["plan_idx"] for r in rows], dtype=np.int64),
                "sha256": np.array([r["sha256"] for r in rows], dtype="U64"),
                "width": np.array([r["width"] for r in rows], dtype=np.int32),
                "height": np.array([r["height"] for r in rows], dtype=np.int32),
                "emb": np.concatenate(state["emb"])
                if state["emb"]
                else np.zeros((0, bundle.embed_dim), np.float32),
                "tokens": np.concatenate(state["tok"])
                if state["tok"]
                else np.zeros((0, n_tok, width), tok_dtype),
                "info": np.array(json.dumps({"errors": state["errors"], "dups": state["dups"]})),
            }
            if opts.token_dtype == "int8":
                arrays["scales"] = (
                    np.concatenate(state["scales"]) if state["scales"] else np.zeros((0, n_tok), np.float32)
                )
            save_npz(shard_path(wdir, "image", shard), arrays)
            bar.update(len(state["errors"]) + len(state["dups"]))

        for shard, idx, res in stream:
            if shard != cur:
                if cur is not None:
                    commit(cur)
                cur = shard
                state = {
                    "batch": [],
                    "rows": [],
                    "emb": [],
                    "tok": [],
                    "scales": [],
                    "errors": [],
                    "dups": [],
                }
            if "error" in res:
                state["errors"].append({"plan_idx": idx, "path": images[idx]["path"], "error": res["error"]})
                continue
            sha = res["sha256"]
            if sha in known:
                state["dups"].append({"plan_idx": idx, "same_as_id": known[sha]})
                continue
            if sha in seen:
                state["dups"].append({"plan_idx": idx, "same_as_plan": seen[sha]})
                continue
            seen[sha] = idx
            state["batch"].append({"plan_idx": idx, **res})
            if len(state["batch"]) >= opts.batch_size:
                flush_batch()
        if cur is not None:
            commit(cur)


def encode_texts(
    wdir: Path,
    plan: dict[str, Any],
    bundle: Encoder,
    opts: BuildOptions,
    bar: Any,
) -> None:
    """Encode the text shards not committed yet."""
    texts = plan["texts"]
    for s in range(plan["n_text_shards"]):
        p = shard_path(wdir, "text", s)
        if p.is_file():
            continue
        lo, hi = s * opts.text_shard_size, min(len(texts), (s + 1) * opts.text_shard_size)
        embs, toks, all_ids, masks = [], [], [], []
        for a in range(lo, hi, opts.text_batch_size):
            b = min(hi, a + opts.text_batch_size)
            ids, mask = bundle.tokenize([t["caption"] for t in texts[a:b]])
            emb, tok = bundle.encode_ids(ids, mask)
            embs.append(emb)
            all_ids.append(ids.astype(np.int32))
            masks.append(mask.astype(np.uint8))
            if opts.text_features == "tokens":
                toks.append(tok.astype(np.float16))
            bar.update(b - a)
        arrays = {
            "plan_idx": np.arange(lo, hi, dtype=np.int64),
            "emb": np.concatenate(embs),
            "token_ids": np.concatenate(all_ids),
            "mask": np.concatenate(masks),
        }
        if toks:
            arrays["tokens"] = np.concatenate(toks)
        save_npz(p, arrays)


def items_done(wdir: Path, plan: dict[str, Any], opts: BuildOptions) -> int:
    """Planned items already in committed shards (where a resumed progress bar starts)."""
    done = 0
    for s in range(plan["n_image_shards"]):
        if shard_path(wdir, "image", s).is_file():
            done += min(len(plan["images"]), (s + 1) * opts.shard_size) - s * opts.shard_size
    for s in range(plan["n_text_shards"]):
        if shard_path(wdir, "text", s).is_file():
            done += min(len(plan["texts"]), (s + 1) * opts.text_shard_size) - s * opts.text_shard_size
    return done
