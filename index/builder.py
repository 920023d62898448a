"""Index builds and changes: ``build``, ``add`` (encode sources, resumable) and ``delete``.

A build/add runs in three steps:

1. **Plan** (``work/<op>/plan.json``, written once): sources are read into an ordered list of images
   (unique by path) and texts (unique by cleaned caption, and not yet in the index). The plan is cut into
   shards of ``shard_size`` images / ``text_shard_size`` texts.
2. **Encode**: images are read, hashed and decoded by a thread pool that runs ahead of the model (decoding
   overlaps ONNX Runtime, which releases the GIL); the main thread sees them in plan order, drops content
   duplicates (sha256 of the bytes, against the index and everything before), batches the rest through the
   image encoder and commits each finished shard atomically (``shards/img-00007.npz``, tmp + rename) with
   embeddings, token features and metadata rows. Unreadable images are recorded in the shard and skipped.
   After a crash (even kill -9), ``resume=True`` reloads the plan, replays the committed shards' hashes and
   continues with the first missing shard. Shards and their batches are fixed by the plan, so a resumed
   build produces the same ids, vectors and metadata as an uninterrupted one.
3. **Publish**: ids are assigned in plan order (images, then texts), the shards are streamed into a new
   segment, SQLite and FAISS are updated into a new version folder, which is renamed into place before the
   ``current`` pointer moves. Old versions beyond ``keep_versions`` are pruned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from albef.index import ann, layout, metadata
from albef.index.errors import IndexError_, IndexNotFoundError, ResumeError, SourceError
from albef.index.features import TEXT_FEATURES, TOKEN_DTYPES, Segment, SegmentWriter, encode_tokens
from albef.index.sources import read_sources
from albef.model.image import DEFAULT_FORMATS, ImageFormatError, open_image, upright

from albef import atomic

log = logging.getLogger(__name__)

KINDS = ("image", "text")


class Encoder(Protocol):
    """What the builder needs from a model bundle (``albef.model.runtime.Bundle`` provides it)."""

    bundle_id: str
    embed_dim: int
    image_res: int
    image_tokens_shape: tuple[int, int]
    text_width: int
    max_tokens: int

    def preprocess(self, images: Sequence[Any], *, exif_transpose: bool = True) -> np.ndarray: ...
    def encode_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class BuildOptions:
    batch_size: int = 16  # images per encoder call
    text_batch_size: int = 64
    shard_size: int = 256  # images per committed shard
    text_shard_size: int = 1024
    workers: int = 4  # image reading/decoding threads
    token_dtype: str = "fp16"  # image token features: fp16 | int8
    text_features: str = "tokens"  # text re-rank features: tokens (fp16) | ids (re-encoded at query time)
    factory: str | None = None  # FAISS factory string; None = choose under max_memory
    max_memory: str | None = None  # None: the index's recorded budget (add), else ann.DEFAULT_MAX_MEMORY
    flat_below: int = ann.FLAT_BELOW
    target_recall: float = 0.95
    keep_versions: int = 5
    image_root: str | None = None
    progress: bool = True
    exif_transpose: bool = True  # False: the official loader (EXIF orientation ignored)
    image_formats: tuple[str, ...] = DEFAULT_FORMATS  # decoders an image may reach; others are refused

    def check(self) -> None:
        if self.token_dtype not in TOKEN_DTYPES:
            raise IndexError_(f"token dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        if self.text_features not in TEXT_FEATURES:
            raise IndexError_(f"text features must be one of {TEXT_FEATURES}, got {self.text_features!r}")
        for name in ("batch_size", "text_batch_size", "shard_size", "text_shard_size", "workers", "keep_versions"):
            if int(getattr(self, name)) < 1:
                raise IndexError_(f"{name} must be at least 1")
        if self.max_memory is not None:
            ann.parse_size(self.max_memory)

    def plan_key(self) -> dict[str, Any]:
        """Options that change the result: a resumed build must use the same ones."""
        keys = ("batch_size", "text_batch_size", "shard_size", "text_shard_size", "token_dtype", "text_features",
                "image_root", "exif_transpose")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Result:
    version: str
    index_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# public operations


def build(index_dir: str | Path, bundle: Encoder, sources: Sequence[str | Path], options: BuildOptions | None = None,
          *, resume: bool = False, restart: bool = False) -> Result:
    """Build a new index in ``index_dir`` (which must not hold one yet) from ``sources``."""
    opts = options or BuildOptions()
    opts.max_memory = opts.max_memory or ann.DEFAULT_MAX_MEMORY
    opts.check()
    index_dir = Path(index_dir)
    if layout.current_version(index_dir) is not None:
        raise IndexError_(f"{index_dir} already holds an index (version {layout.current_version(index_dir)}); "
                          "use `albef index add` to extend it")
    with layout.writer_lock(index_dir):
        return _encode_and_publish(index_dir, bundle, sources, opts, base=None, resume=resume, restart=restart)


def add(index_dir: str | Path, bundle: Encoder, sources: Sequence[str | Path], options: BuildOptions | None = None,
        *, resume: bool = False, restart: bool = False) -> Result:
    """Encode ``sources`` into a new version of an existing index (content already indexed is skipped)."""
    opts = options or BuildOptions()
    index_dir = Path(index_dir)
    with layout.writer_lock(index_dir):
        base = layout.current_version(index_dir)
        if base is None:
            raise IndexNotFoundError(f"no index in {index_dir}; create one with `albef index build`")
        manifest = layout.read_manifest(layout.version_path(index_dir, base))
        layout.check_bundle(manifest, bundle.bundle_id, index_dir)
        # Feature layout is a property of the index: later segments follow the first one.
        opts.token_dtype = manifest["features"]["token_dtype"]
        opts.text_features = manifest["features"]["text_features"]
        # The budget the index was built under, unless this command names another.
        opts.max_memory = opts.max_memory or manifest.get("max_memory") or ann.DEFAULT_MAX_MEMORY
        opts.check()
        return _encode_and_publish(index_dir, bundle, sources, opts, base=base, resume=resume, restart=restart)


def delete(index_dir: str | Path, ids: Sequence[int], *, keep_versions: int | None = None,
           max_memory: str | None = None) -> Result:
    """Remove items by id into a new version. Unknown ids are refused (nothing changes)."""
    index_dir = Path(index_dir)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise IndexError_("no ids to delete")
    with layout.writer_lock(index_dir):
        layout.clean_stale_tmp(index_dir)
        base = layout.current_version(index_dir)
        if base is None:
            raise IndexNotFoundError(f"no index in {index_dir}")
        base_dir = layout.version_path(index_dir, base)
        manifest = layout.read_manifest(base_dir)
        conn = metadata.connect_readonly(base_dir / "meta.sqlite")
        try:
            found = metadata.existing_ids(conn, ids)
        finally:
            conn.close()
        unknown = [i for i in ids if i not in found]
        if unknown:
            shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
            raise IndexError_(f"unknown ids (nothing deleted): {shown}")
        t0 = time.perf_counter()
        version = layout.next_version(index_dir)
        tmp = layout.versions_dir(index_dir) / f".tmp-{version}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            conn = metadata.create(tmp / "meta.sqlite", base=base_dir / "meta.sqlite")
            metadata.delete(conn, ids)
            conn.commit()
            removed = {k: np.array([i for i in ids if found[i] == k], dtype=np.int64) for k in KINDS}
            opts = BuildOptions(keep_versions=keep_versions or manifest.get("keep_versions", 5),
                                max_memory=max_memory or manifest.get("max_memory") or ann.DEFAULT_MAX_MEMORY)
            report = {"operation": "delete", "deleted": {k: v.tolist() for k, v in removed.items()}, "seconds": {}}
            new_manifest = _publish_version(index_dir, tmp, version, conn, manifest, base_dir, opts,
                                            segments=list(manifest["segments"]), new={}, removed=removed,
                                            operation="delete", next_id=int(manifest["next_id"]),
                                            report=report, t0=t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        layout.prune(index_dir, opts.keep_versions)
        return Result(version, index_dir, new_manifest, report)


# ---------------------------------------------------------------------------------------------------
# plan


def _make_plan(index_dir: Path, bundle: Encoder, sources: Sequence[str | Path], opts: BuildOptions,
               base: str | None) -> dict[str, Any]:
    from albef.model.text import pre_caption

    known_text: dict[str, int] = {}
    if base is not None:
        conn = metadata.connect_readonly(layout.version_path(index_dir, base) / "meta.sqlite")
        try:
            known_text = metadata.shas(conn, "text")
        finally:
            conn.close()
    images: list[dict[str, Any]] = []
    by_path: dict[str, int] = {}
    texts: list[dict[str, Any]] = []
    text_seen: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    for rec in read_sources(sources, opts.image_root):
        img_idx = None
        if rec.image is not None:
            img_idx = by_path.get(rec.image)
            if img_idx is None:
                img_idx = by_path[rec.image] = len(images)
                images.append({"path": rec.image, "caption": rec.captions[0] if rec.captions else None,
                               "metadata": rec.metadata, "source": rec.source})
            else:  # the same file again (train-format JSON repeats it per caption): merge, first wins
                img = images[img_idx]
                if img["caption"] is None and rec.captions:
                    img["caption"] = rec.captions[0]
                if rec.metadata:
                    img["metadata"] = {**rec.metadata, **(img["metadata"] or {})}
        for cap in rec.captions:
            clean = pre_caption(cap)
            if not clean:
                skipped.append({"caption": cap, "reason": "empty after cleaning", "source": rec.source})
                continue
            sha = hashlib.sha256(clean.encode("utf-8")).hexdigest()
            if sha in known_text:
                skipped.append({"caption": cap, "reason": "duplicate", "same_as": known_text[sha],
                                "source": rec.source})
                continue
            if sha in text_seen:
                skipped.append({"caption": cap, "reason": "duplicate", "same_as_plan": text_seen[sha],
                                "source": rec.source})
                continue
            text_seen[sha] = len(texts)
            texts.append({"caption": cap, "sha256": sha, "image": img_idx, "metadata": rec.metadata,
                          "source": rec.source})
    if not images and not texts:
        raise SourceError("nothing to index: the sources hold no images, and no captions that are not indexed "
                          "already")
    return {
        "format": 1, "base_version": base, "bundle_id": bundle.bundle_id,
        "sources": [str(Path(s).resolve()) for s in sources], "options": opts.plan_key(),
        "images": images, "texts": texts, "skipped_texts": skipped,
        "n_image_shards": -(-len(images) // opts.shard_size), "n_text_shards": -(-len(texts) // opts.text_shard_size),
    }


def _open_work(index_dir: Path, bundle: Encoder, sources: Sequence[str | Path], opts: BuildOptions,
               base: str | None, resume: bool, restart: bool) -> tuple[Path, dict[str, Any], bool]:
    """The work folder of this build/add: a fresh plan, or the interrupted one when resuming."""
    wdir = layout.work_dir(index_dir) / "pending"
    request = {"base_version": base, "bundle_id": bundle.bundle_id,
               "sources": [str(Path(s).resolve()) for s in sources], "options": opts.plan_key()}
    plan_file = wdir / "plan.json"
    if plan_file.is_file() and not restart:
        plan = json.loads(plan_file.read_text())
        old = {k: plan.get(k) for k in request}
        if not resume:
            raise ResumeError(f"an interrupted build/add is pending in {wdir}: pass --resume to continue it "
                              "or --restart to discard it")
        if old != request:
            diff = sorted(k for k in request if old[k] != request[k])
            raise ResumeError(f"--resume: the pending build differs in {', '.join(diff)}; "
                              "repeat the original command or pass --restart")
        return wdir, plan, True
    if wdir.exists():
        shutil.rmtree(wdir)
    if resume:
        log.info("nothing to resume; starting a new build", extra={"index": str(index_dir)})
    plan = _make_plan(index_dir, bundle, sources, opts, base)
    (wdir / "shards").mkdir(parents=True)
    layout.write_json_atomic(plan_file, plan)
    return wdir, plan, False


# ---------------------------------------------------------------------------------------------------
# encode


def _shard_path(wdir: Path, kind: str, i: int) -> Path:
    return wdir / "shards" / f"{'img' if kind == 'image' else 'txt'}-{i:05d}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic.writing(path) as fh:
        np.savez(fh, **arrays)


def _read_image(path: str, bundle: Encoder, opts: BuildOptions) -> dict[str, Any]:
    """Runs in a worker thread: bytes -> sha256, upright size, pixels. Never raises."""
    from PIL import UnidentifiedImageError

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


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
                 ahead: int) -> Iterator[Any]:
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


def _encode_images(wdir: Path, plan: dict[str, Any], bundle: Encoder, opts: BuildOptions,
                   known: dict[str, int], bar: Any) -> None:
    images = plan["images"]
    seen: dict[str, int] = {}  # sha -> plan index of the first occurrence in this build
    pending: list[int] = []
    for s in range(plan["n_image_shards"]):
        p = _shard_path(wdir, "image", s)
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                for idx, sha in zip(z["plan_idx"].tolist(), z["sha256"].tolist(), strict=True):
                    seen.setdefault(sha, idx)
        else:
            pending.append(s)
    if not pending:
        return
    work = [(s, i) for s in pending for i in range(s * opts.shard_size, min(len(images), (s + 1) * opts.shard_size))]
    ahead = 2 * opts.batch_size + 2 * opts.workers
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="albef-decode") as pool:
        stream = _ordered_map(pool, lambda si: (si[0], si[1], _read_image(images[si[1]]["path"], bundle, opts)), work,
                              ahead)
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
                "emb": np.concatenate(state["emb"]) if state["emb"] else np.zeros((0, bundle.embed_dim), np.float32),
                "tokens": np.concatenate(state["tok"]) if state["tok"] else np.zeros((0, n_tok, width), tok_dtype),
                "info": np.array(json.dumps({"errors": state["errors"], "dups": state["dups"]})),
            }
            if opts.token_dtype == "int8":
                arrays["scales"] = (np.concatenate(state["scales"]) if state["scales"]
                                    else np.zeros((0, n_tok), np.float32))
            _save_npz(_shard_path(wdir, "image", shard), arrays)
            bar.update(len(state["errors"]) + len(state["dups"]))

        for shard, idx, res in stream:
            if shard != cur:
                if cur is not None:
                    commit(cur)
                cur = shard
                state = {"batch": [], "rows": [], "emb": [], "tok": [], "scales": [], "errors": [], "dups": []}
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


def _encode_texts(wdir: Path, plan: dict[str, Any], bundle: Encoder, opts: BuildOptions, bar: Any) -> None:
    texts = plan["texts"]
    for s in range(plan["n_text_shards"]):
        p = _shard_path(wdir, "text", s)
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
        arrays = {"plan_idx": np.arange(lo, hi, dtype=np.int64), "emb": np.concatenate(embs),
                  "token_ids": np.concatenate(all_ids), "mask": np.concatenate(masks)}
        if toks:
            arrays["tokens"] = np.concatenate(toks)
        _save_npz(p, arrays)


def _encode_and_publish(index_dir: Path, bundle: Encoder, sources: Sequence[str | Path], opts: BuildOptions,
                        base: str | None, resume: bool, restart: bool) -> Result:
    from albef.progress import progress_bar

    t0 = time.perf_counter()
    index_dir.mkdir(parents=True, exist_ok=True)
    layout.clean_stale_tmp(index_dir)
    layout.gc_segments(index_dir)
    wdir, plan, resumed = _open_work(index_dir, bundle, sources, opts, base, resume, restart)
    base_dir = layout.version_path(index_dir, base) if base is not None else None
    base_manifest = layout.read_manifest(base_dir) if base_dir is not None else None
    known: dict[str, int] = {}
    if base_dir is not None:
        conn = metadata.connect_readonly(base_dir / "meta.sqlite")
        try:
            known = metadata.shas(conn, "image")
        finally:
            conn.close()
    n_img, n_txt = len(plan["images"]), len(plan["texts"])
    done = _items_done(wdir, plan, opts)
    log.info("encoding", extra={"index": str(index_dir), "images": n_img, "texts": n_txt, "already_done": done,
                                "resumed": resumed})
    t_enc = time.perf_counter()
    with progress_bar(total=n_img + n_txt, initial=done, unit="item", desc="encode", dynamic_ncols=True,
                      enabled=opts.progress, smoothing=0.1) as bar:
        _encode_images(wdir, plan, bundle, opts, known, bar)
        _encode_texts(wdir, plan, bundle, opts, bar)
    enc_s = time.perf_counter() - t_enc
    encoded_now = n_img + n_txt - done
    result = _publish_build(index_dir, wdir, plan, bundle, opts, base, base_dir, base_manifest, t0,
                            {"encode_s": enc_s, "encoded_items": encoded_now, "resumed": resumed,
                             "done_before": done})
    shutil.rmtree(wdir, ignore_errors=True)
    layout.prune(index_dir, opts.keep_versions)
    return result


def _items_done(wdir: Path, plan: dict[str, Any], opts: BuildOptions) -> int:
    done = 0
    for s in range(plan["n_image_shards"]):
        if _shard_path(wdir, "image", s).is_file():
            done += min(len(plan["images"]), (s + 1) * opts.shard_size) - s * opts.shard_size
    for s in range(plan["n_text_shards"]):
        if _shard_path(wdir, "text", s).is_file():
            done += min(len(plan["texts"]), (s + 1) * opts.text_shard_size) - s * opts.text_shard_size
    return done


# ---------------------------------------------------------------------------------------------------
# publish


def _publish_build(index_dir: Path, wdir: Path, plan: dict[str, Any], bundle: Encoder, opts: BuildOptions,
                   base: str | None, base_dir: Path | None, base_manifest: dict[str, Any] | None, t0: float,
                   timing: dict[str, Any]) -> Result:
    images, texts = plan["images"], plan["texts"]
    next_id = int(base_manifest["next_id"]) if base_manifest else 0
    # Pass 1 over the image shards (small arrays only): ids in plan order, duplicates, failures.
    img_id: dict[int, int] = {}
    dup_of: dict[int, tuple[str, int]] = {}
    kept: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for s in range(plan["n_image_shards"]):
        with np.load(_shard_path(wdir, "image", s), allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            for idx, sha, w, h in zip(z["plan_idx"].tolist(), z["sha256"].tolist(), z["width"].tolist(),
                                      z["height"].tolist(), strict=True):
                img_id[idx] = next_id
                kept.append({"plan_idx": idx, "id": next_id, "sha256": sha, "width": w, "height": h})
                next_id += 1
        errors.extend(info["errors"])
        for d in info["dups"]:
            dup_of[d["plan_idx"]] = ("id", d["same_as_id"]) if "same_as_id" in d else ("plan", d["same_as_plan"])
    for idx, (how, target) in dup_of.items():
        if how == "plan":
            img_id[idx] = img_id[target]
        else:
            img_id[idx] = target
    text_ids = list(range(next_id, next_id + len(texts)))
    next_id += len(texts)

    version = layout.next_version(index_dir)
    seg_name = f"seg-{version}"
    seg_tmp = layout.segments_dir(index_dir) / f".tmp-{seg_name}-{os.getpid()}"
    tmp = layout.versions_dir(index_dir) / f".tmp-{version}-{os.getpid()}"
    t_pub = time.perf_counter()
    try:
        writer = SegmentWriter(seg_tmp, n_images=len(kept), n_texts=len(texts), embed_dim=bundle.embed_dim,
                               image_tokens_shape=tuple(bundle.image_tokens_shape), text_len=bundle.max_tokens,
                               text_width=bundle.text_width, token_dtype=opts.token_dtype,
                               text_features=opts.text_features)
        new_vecs: dict[str, list[np.ndarray]] = {"image": [], "text": []}
        pos = 0
        for s in range(plan["n_image_shards"]):
            with np.load(_shard_path(wdir, "image", s), allow_pickle=False) as z:
                m = len(z["plan_idx"])
                ids = np.array([kept[pos + j]["id"] for j in range(m)], dtype=np.int64)
                writer.add_images(ids, z["emb"], z["tokens"], z["scales"] if "scales" in z.files else None)
                new_vecs["image"].append(np.asarray(z["emb"]))
                pos += m
        for s in range(plan["n_text_shards"]):
            with np.load(_shard_path(wdir, "text", s), allow_pickle=False) as z:
                idx = z["plan_idx"]
                ids = np.array([text_ids[i] for i in idx.tolist()], dtype=np.int64)
                writer.add_texts(ids, z["emb"], z["token_ids"], z["mask"], z["tokens"] if "tokens" in z.files else None)
                new_vecs["text"].append(np.asarray(z["emb"]))
        seg_info = writer.close()
        layout.segments_dir(index_dir).mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True)
        conn = metadata.create(tmp / "meta.sqlite", base=base_dir / "meta.sqlite" if base_dir else None)
        rows = []
        for row, k in enumerate(kept):
            img = images[k["plan_idx"]]
            rows.append({"id": k["id"], "kind": "image", "path": img["path"], "caption": img["caption"],
                         "width": k["width"], "height": k["height"], "sha256": k["sha256"],
                         "metadata": img["metadata"], "image_id": None, "source": img["source"],
                         "segment": seg_name, "row": row})
        for row, t in enumerate(texts):
            img_idx = t["image"]
            rows.append({"id": text_ids[row], "kind": "text",
                         "path": images[img_idx]["path"] if img_idx is not None else None,
                         "caption": t["caption"], "width": None, "height": None, "sha256": t["sha256"],
                         "metadata": t["metadata"], "image_id": img_id.get(img_idx) if img_idx is not None else None,
                         "source": t["source"], "segment": seg_name, "row": row})
        metadata.insert(conn, rows)
        conn.commit()
        atomic.publish_dir(seg_tmp, layout.segments_dir(index_dir) / seg_name)
        new = {
            "image": (np.array([k["id"] for k in kept], dtype=np.int64),
                      np.concatenate(new_vecs["image"]) if new_vecs["image"] else None),
            "text": (np.array(text_ids, dtype=np.int64),
                     np.concatenate(new_vecs["text"]) if new_vecs["text"] else None),
        }
        dup_rows = [{"path": images[i]["path"], "same_as_id": img_id[i]} for i in sorted(dup_of)]
        enc_items = timing["encoded_items"]
        report = {
            "operation": "add" if base else "build",
            "sources": plan["sources"],
            "resumed": timing["resumed"],
            "images": {"planned": len(images), "indexed": len(kept), "duplicates": len(dup_of),
                       "failed": len(errors)},
            "texts": {"planned": len(texts) + len(plan["skipped_texts"]), "indexed": len(texts),
                      "skipped": len(plan["skipped_texts"])},
            "failed": errors,
            "duplicate_images": dup_rows,
            "skipped_texts": plan["skipped_texts"],
            "seconds": {"encode": round(timing["encode_s"], 3)},
            "throughput": {"items_encoded_this_run": enc_items,
                           "items_per_s": round(enc_items / timing["encode_s"], 2) if timing["encode_s"] > 0 else None},
            "shards": {"image": plan["n_image_shards"], "text": plan["n_text_shards"]},
            "items_done_before_this_run": timing["done_before"],
            "segment": seg_info,
        }
        parent = base_manifest or {"segments": [], "features": {"token_dtype": opts.token_dtype,
                                                                "text_features": opts.text_features}}
        manifest = _publish_version(index_dir, tmp, version, conn, parent, base_dir, opts,
                                    segments=[*parent["segments"], seg_name], new=new, removed={},
                                    operation=report["operation"], next_id=next_id, report=report, t0=t0,
                                    bundle=bundle, t_pub=t_pub)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(seg_tmp, ignore_errors=True)
        raise
    return Result(version, index_dir, manifest, report)


def _gather_vectors(index_dir: Path, conn: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings) of every live item of ``kind`` in id order, read from the segments."""
    locs = metadata.all_locations(conn, kind)
    ids = np.array([i for i, _, _ in locs], dtype=np.int64)
    if not locs:
        return ids, np.zeros((0, 0), np.float32)
    by_seg: dict[str, list[tuple[int, int]]] = {}
    for pos, (_, seg, row) in enumerate(locs):
        by_seg.setdefault(seg, []).append((pos, row))
    out: np.ndarray | None = None
    for seg, pairs in by_seg.items():
        emb = Segment(layout.segments_dir(index_dir) / seg).array(f"{kind}_emb")
        if out is None:
            out = np.empty((len(locs), emb.shape[1]), dtype=np.float32)
        positions = np.array([p for p, _ in pairs])
        out[positions] = emb[np.array([r for _, r in pairs])]
    assert out is not None
    return ids, out


def _publish_version(index_dir: Path, tmp: Path, version: str, conn: Any, parent: dict[str, Any],
                     base_dir: Path | None, opts: BuildOptions, *, segments: list[str],
                     new: dict[str, tuple[np.ndarray, np.ndarray | None]], removed: dict[str, np.ndarray],
                     operation: str, next_id: int, report: dict[str, Any], t0: float,
                     bundle: Encoder | None = None, t_pub: float | None = None) -> dict[str, Any]:
    """FAISS update + manifest + report into ``tmp``, then rename to ``versions/<version>`` and move the pointer."""
    t_pub = t_pub or time.perf_counter()
    vecs = {k: _gather_vectors(index_dir, conn, k) for k in KINDS}
    conn.close()
    ann_entries: dict[str, Any] = {}
    for kind in KINDS:
        other = vecs["text" if kind == "image" else "image"][1]
        ann_entries[kind] = _update_ann(kind, tmp, base_dir, parent.get("ann", {}).get(kind), opts,
                                        vecs[kind], new.get(kind), removed.get(kind), other)
    counts = {k: len(vecs[k][0]) for k in KINDS}
    if bundle is not None:
        bundle_info = {"embed_dim": bundle.embed_dim, "image_res": bundle.image_res,
                       "image_tokens_shape": list(bundle.image_tokens_shape), "text_width": bundle.text_width,
                       "max_tokens": bundle.max_tokens, "name": getattr(getattr(bundle, "config", None), "name", None),
                       "path": str(Path(bundle.path).resolve()) if getattr(bundle, "path", None) else None}
        bundle_id = bundle.bundle_id
    else:
        bundle_info, bundle_id = parent["bundle"], parent["bundle_id"]
    manifest = {
        "format": "albef-index", "format_version": layout.FORMAT_VERSION, "version": version,
        "parent": parent.get("version"), "operation": operation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle_id": bundle_id, "bundle": bundle_info, "counts": counts, "next_id": next_id,
        "segments": segments, "features": parent["features"], "ann": ann_entries,
        "keep_versions": opts.keep_versions, "max_memory": opts.max_memory,
    }
    manifest["bytes_per_item"] = _bytes_per_item(index_dir, tmp, manifest)
    report["seconds"]["publish"] = round(time.perf_counter() - t_pub, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    manifest["report"] = {k: report[k] for k in ("operation",) if k in report}
    layout.write_json_atomic(tmp / "report.json", report)
    layout.write_json_atomic(tmp / "manifest.json", manifest)
    atomic.publish_dir(tmp, layout.versions_dir(index_dir) / version)
    layout.set_current(index_dir, version)
    log.info("published", extra={"index": str(index_dir), "version": version, "operation": operation, **counts})
    return manifest


def _update_ann(kind: str, tmp: Path, base_dir: Path | None, prev: dict[str, Any] | None, opts: BuildOptions,
                live: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray | None] | None,
                removed: np.ndarray | None, other: np.ndarray) -> dict[str, Any]:
    ids, vectors = live
    n = len(ids)
    if n == 0:
        return {"factory": None, "ntotal": 0, "file": None}
    d = vectors.shape[1]
    pinned = bool(opts.factory) or bool(prev and prev.get("pinned"))
    if opts.factory:
        factory, reason, est = opts.factory, "given with --factory", ann.estimate_bytes(opts.factory, n, d)
    elif prev and prev.get("pinned"):
        factory, reason, est = prev["factory"], prev.get("reason", "pinned"), ann.estimate_bytes(prev["factory"], n, d)
    else:
        c = ann.choose(n, d, opts.max_memory, opts.flat_below)
        factory, reason, est = c.factory, c.reason, c.est_bytes
    prev_file = base_dir / f"{kind}.faiss" if base_dir is not None and prev and prev.get("file") else None
    index = None
    how = "rebuilt"
    if prev_file is not None and prev.get("factory") == factory and prev_file.is_file():
        index = ann.read(prev_file)
        if removed is not None and len(removed):
            if ann.supports_remove(factory):
                ann.remove(index, removed)
                how = "removed"
            else:
                index = None  # HNSW cannot remove: rebuild below
        if index is not None and new is not None and len(new[0]):
            ann.add(index, new[1], new[0])
            how = "added" if how != "removed" else how
        if index is not None and int(index.ntotal) != n:
            log.warning("faiss index out of step with metadata; rebuilding", extra={"kind": kind})
            index = None
    if index is None:
        index = ann.build(vectors, ids, factory)
        how = "rebuilt" if prev_file is not None else "built"
    entry = ann.tune(index, factory, vectors, ids, queries=other if len(other) else None,
                     target_recall=opts.target_recall)
    path = tmp / f"{kind}.faiss"
    ann.write(index, path)
    entry.update(file=path.name, file_bytes=path.stat().st_size, reason=reason, est_bytes=est, pinned=pinned,
                 update=how, max_memory=opts.max_memory)
    return entry


def _bytes_per_item(index_dir: Path, tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Bytes on disk per live item, by part. Dead rows of deleted items count (they stay in segments)."""
    out: dict[str, Any] = {}
    totals = {"image": 0, "text": 0}
    rows = {"image": 0, "text": 0}
    parts: dict[str, dict[str, int]] = {"image": {}, "text": {}}
    for seg in manifest["segments"]:
        sdir = layout.segments_dir(index_dir) / seg
        info = json.loads((sdir / "segment.json").read_text())
        rows["image"] += info["n_images"]
        rows["text"] += info["n_texts"]
        for name, b in info["bytes"].items():
            kind = "image" if name.startswith("image_") else "text"
            parts[kind][name] = parts[kind].get(name, 0) + b
            totals[kind] += b
    meta_bytes = (tmp / "meta.sqlite").stat().st_size
    n_all = max(1, sum(manifest["counts"].values()))
    for kind in KINDS:
        n = manifest["counts"][kind]
        if n == 0:
            out[kind] = None
            continue
        faiss_b = manifest["ann"][kind].get("file_bytes", 0) or 0
        per = {name.removeprefix(f"{kind}_"): round(b / max(rows[kind], 1), 1) for name, b in parts[kind].items()}
        per["faiss"] = round(faiss_b / n, 1)
        per["sqlite"] = round(meta_bytes / n_all, 1)
        per["total"] = round((totals[kind] + faiss_b) / n + meta_bytes / n_all, 1)
        out[kind] = per
    return out
