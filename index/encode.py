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


def read_image(path: str, bundle: Encoder, opts: BuildOptions) -> dict[str, Any]:
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


def ordered_map(
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


class ImageShard:
    """The rule that turns one image shard's decoded items, seen in plan order, into encoder batches, errors
    and duplicates. Local and Ray builds (:mod:`albef.index.ray_build`) both apply it, so the batches, and with
    them the vectors, are the same whichever runs them.

    ``known`` maps the index's image hashes to ids; ``seen`` maps the hashes of the build's earlier images to
    their plan index, and is updated with this shard's."""

    def __init__(self, shard: int, known: dict[str, int], seen: dict[str, int], batch_size: int) -> None:
        self.shard = shard
        self.known = known
        self.seen = seen
        self.batch_size = batch_size
        self.batch: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.dups: list[dict[str, Any]] = []

    def add(self, idx: int, path: str, res: dict[str, Any]) -> list[dict[str, Any]] | None:
        """One item's :func:`read_image` result; returns a full batch (items with their pixels) to encode."""
        if "error" in res:
            self.errors.append({"plan_idx": idx, "path": path, "error": res["error"]})
            return None
        sha = res["sha256"]
        if sha in self.known:
            self.dups.append({"plan_idx": idx, "same_as_id": self.known[sha]})
            return None
        if sha in self.seen:
            self.dups.append({"plan_idx": idx, "same_as_plan": self.seen[sha]})
            return None
        self.seen[sha] = idx
        self.batch.append({"plan_idx": idx, **res})
        return self.take() if len(self.batch) >= self.batch_size else None

    def take(self) -> list[dict[str, Any]] | None:
        """The batch collected so far (the last one of a shard may be short), or None if empty."""
        batch, self.batch = self.batch, []
        return batch or None


def encode_image_batch(
    bundle: Encoder, pixels: np.ndarray, token_dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One encoder call: pixels -> (embeddings, stored token features, int8 scales or None)."""
    emb, tok = bundle.encode_pixels(pixels)
    stored, scales = encode_tokens(tok, token_dtype)
    return emb, stored, scales


def image_shard_arrays(
    rows: list[dict[str, Any]],
    embs: list[np.ndarray],
    toks: list[np.ndarray],
    scales: list[np.ndarray],
    errors: list[dict[str, Any]],
    dups: list[dict[str, Any]],
    bundle: Encoder,
    opts: BuildOptions,
) -> dict[str, np.ndarray]:
    """What an image shard file holds: the encoded rows (plan_idx, sha256, width, height) with their
    embeddings and token features in batch order, and the shard's errors and duplicates."""
    n_tok, width = bundle.image_tokens_shape
    tok_dtype = np.float16 if opts.token_dtype == "fp16" else np.int8
    arrays = {
        "plan_idx": np.array([r["plan_idx"] for r in rows], dtype=np.int64),
        "sha256": np.array([r["sha256"] for r in rows], dtype="U64"),
        "width": np.array([r["width"] for r in rows], dtype=np.int32),
        "height": np.array([r["height"] for r in rows], dtype=np.int32),
        "emb": np.concatenate(embs) if embs else np.zeros((0, bundle.embed_dim), np.float32),
        "tokens": np.concatenate(toks) if toks else np.zeros((0, n_tok, width), tok_dtype),
        "info": np.array(json.dumps({"errors": errors, "dups": dups})),
    }
    if opts.token_dtype == "int8":
        arrays["scales"] = np.concatenate(scales) if scales else np.zeros((0, n_tok), np.float32)
    return arrays


def committed_image_hashes(wdir: Path, plan: dict[str, Any]) -> tuple[dict[str, int], list[int]]:
    """(hash -> plan index of the committed shards' encoded images, the image shards still to encode)."""
    seen: dict[str, int] = {}
    pending: list[int] = []
    for s in range(plan["n_image_shards"]):
        p = shard_path(wdir, "image", s)
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                for idx, sha in zip(z["plan_idx"].tolist(), z["sha256"].tolist(), strict=True):
                    seen.setdefault(sha, idx)
        else:
            pending.append(s)
    return seen, pending


def shard_items(plan: dict[str, Any], opts: BuildOptions, kind: str, shard: int) -> range:
    """Plan indices of one shard."""
    n, size = (
        (len(plan["images"]), opts.shard_size)
        if kind == "image"
        else (len(plan["texts"]), opts.text_shard_size)
    )
    return range(shard * size, min(n, (shard + 1) * size))


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
    seen, pending = committed_image_hashes(wdir, plan)  # sha -> plan index of its first occurrence
    if not pending:
        return
    work = [(s, i) for s in pending for i in shard_items(plan, opts, "image", s)]
    ahead = 2 * opts.batch_size + 2 * opts.workers
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="albef-decode") as pool:
        stream = ordered_map(
            pool, lambda si: (si[0], si[1], read_image(images[si[1]]["path"], bundle, opts)), work, ahead
        )
        shard: ImageShard | None = None
        out: dict[str, list[Any]] = {}

        def encode(batch: list[dict[str, Any]] | None) -> None:
            if batch is None:
                return
            pixels = np.stack([b.pop("pixels") for b in batch])
            emb, stored, scales = encode_image_batch(bundle, pixels, opts.token_dtype)
            out["emb"].append(emb)
            out["tok"].append(stored)
            if scales is not None:
                out["scales"].append(scales)
            out["rows"].extend(batch)
            bar.update(len(batch))

        def commit(st: ImageShard) -> None:
            encode(st.take())
            arrays = image_shard_arrays(
                out["rows"], out["emb"], out["tok"], out["scales"], st.errors, st.dups, bundle, opts
            )
            save_npz(shard_path(wdir, "image", st.shard), arrays)
            bar.update(len(st.errors) + len(st.dups))

        for s, idx, res in stream:
            if shard is None or s != shard.shard:
                if shard is not None:
                    commit(shard)
                shard = ImageShard(s, known, seen, opts.batch_size)
                out = {"rows": [], "emb": [], "tok": [], "scales": []}
            encode(shard.add(idx, images[idx]["path"], res))
        if shard is not None:
            commit(shard)


def text_batches(plan: dict[str, Any], opts: BuildOptions, shard: int) -> list[range]:
    """The plan indices of each encoder call of one text shard."""
    r = shard_items(plan, opts, "text", shard)
    return [
        range(a, min(r.stop, a + opts.text_batch_size)) for a in range(r.start, r.stop, opts.text_batch_size)
    ]


def encode_text_batch(
    bundle: Encoder, captions: list[str], text_features: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One encoder call: captions -> (embeddings, token ids int32, mask uint8, fp16 token features or None)."""
    ids, mask = bundle.tokenize(captions)
    emb, tok = bundle.encode_ids(ids, mask)
    tokens = tok.astype(np.float16) if text_features == "tokens" else None
    return emb, ids.astype(np.int32), mask.astype(np.uint8), tokens


def text_shard_arrays(
    items: range, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]
) -> dict[str, np.ndarray]:
    """What a text shard file holds: its plan indices and the :func:`encode_text_batch` results in order."""
    arrays = {
        "plan_idx": np.arange(items.start, items.stop, dtype=np.int64),
        "emb": np.concatenate([p[0] for p in parts]),
        "token_ids": np.concatenate([p[1] for p in parts]),
        "mask": np.concatenate([p[2] for p in parts]),
    }
    toks = [p[3] for p in parts if p[3] is not None]
    if toks:
        arrays["tokens"] = np.concatenate(toks)
    return arrays


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
        parts = []
        for r in text_batches(plan, opts, s):
            parts.append(
                encode_text_batch(bundle, [t["caption"] for t in texts[r.start : r.stop]], opts.text_features)
            )
            bar.update(len(r))
        save_npz(p, text_shard_arrays(shard_items(plan, opts, "text", s), parts))


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
