"""Step 3 of a build/add, and the end of every change: a new version, published atomically.

Ids are assigned in plan order (images, then texts) from the committed shards, which are streamed into a new
segment; SQLite (a copy of the parent's) and FAISS are written into a temporary version folder, which is
renamed into place (:mod:`albef.atomic`) before the ``current`` pointer moves. A failure before the rename
leaves the published index as it was: the temporary folders are removed, and a segment no version names is
collected by the next writer (``layout.gc_segments``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from albef import atomic
from albef.index import layout, metadata
from albef.index.ann_policy import update_ann
from albef.index.encode import shard_path
from albef.index.features import Segment, SegmentWriter
from albef.index.options import KINDS, BuildOptions, Encoder, Result

log = logging.getLogger(__name__)

Vectors = dict[str, tuple[np.ndarray, np.ndarray | None]]  # kind -> (ids, embeddings) added by a change


@dataclass
class VersionChange:
    """What a new version is made of; :func:`publish_version` writes and publishes it."""

    index_dir: Path
    tmp: (
        Path  # the version folder being filled (``versions/.tmp-<version>-<pid>``), meta.sqlite already in it
    )
    version: str
    parent: dict[str, Any]  # the manifest it derives from (a first build: no segments, the chosen features)
    base_dir: Path | None  # the parent's version folder, whose FAISS files may be reused; None: first build
    operation: str  # build | add | delete
    segments: list[str]
    next_id: int
    new: Vectors = field(default_factory=dict)
    removed: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> ids
    bundle: Encoder | None = None  # None: the parent's bundle (a delete encodes nothing)


@dataclass
class _Ids:
    """The ids of a build, from the small arrays of its image shards."""

    kept: list[dict[str, Any]]  # encoded images in plan order: plan_idx, id, sha256, width, height
    image_of: dict[int, int]  # plan index -> id; a duplicate gets the id of the copy that is kept
    dup_of: dict[int, tuple[str, int]]  # plan index -> ("id", indexed id) or ("plan", plan index)
    errors: list[dict[str, Any]]  # images that could not be read
    text_ids: list[int]  # in plan order
    next_id: int  # the first id after this build


# ---------------------------------------------------------------------------------------------------
# build/add


def publish_build(
    index_dir: Path,
    wdir: Path,
    plan: dict[str, Any],
    bundle: Encoder,
    opts: BuildOptions,
    base_dir: Path | None,
    base_manifest: dict[str, Any] | None,
    *,
    t0: float,
    timing: dict[str, Any],
) -> Result:
    """The committed shards of ``plan`` -> a new segment and a new version on top of ``base_manifest``."""
    ids = _assign_ids(wdir, plan, int(base_manifest["next_id"]) if base_manifest else 0)
    version = layout.next_version(index_dir)
    seg_name = f"seg-{version}"
    seg_tmp = layout.segments_dir(index_dir) / f".tmp-{seg_name}-{os.getpid()}"
    tmp = layout.versions_dir(index_dir) / f".tmp-{version}-{os.getpid()}"
    t_pub = time.perf_counter()
    try:
        seg_info, new = _write_segment(seg_tmp, wdir, plan, bundle, opts, ids)
        layout.segments_dir(index_dir).mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True)
        conn = metadata.create(tmp / "meta.sqlite", base=base_dir / "meta.sqlite" if base_dir else None)
        metadata.insert(conn, _metadata_rows(plan, ids, seg_name))
        conn.commit()
        atomic.publish_dir(seg_tmp, layout.segments_dir(index_dir) / seg_name)
        operation = "add" if base_manifest is not None else "build"
        report = _build_report(plan, ids, operation, seg_info, timing)
        parent = base_manifest or {
            "segments": [],
            "features": {"token_dtype": opts.token_dtype, "text_features": opts.text_features},
        }
        change = VersionChange(
            index_dir,
            tmp,
            version,
            parent,
            base_dir,
            operation,
            segments=[*parent["segments"], seg_name],
            next_id=ids.next_id,
            new=new,
            bundle=bundle,
        )
        manifest = publish_version(change, conn, opts, report, t0=t0, t_pub=t_pub)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(seg_tmp, ignore_errors=True)
        raise
    return Result(version, index_dir, manifest, report)


def _assign_ids(wdir: Path, plan: dict[str, Any], next_id: int) -> _Ids:
    """Ids in plan order: encoded images, then texts. Reads the shards' small arrays only."""
    image_of: dict[int, int] = {}
    dup_of: dict[int, tuple[str, int]] = {}
    kept: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for s in range(plan["n_image_shards"]):
        with np.load(shard_path(wdir, "image", s), allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            for idx, sha, w, h in zip(
                z["plan_idx"].tolist(),
                z["sha256"].tolist(),
                z["width"].tolist(),
                z["height"].tolist(),
                strict=True,
            ):
                image_of[idx] = next_id
                kept.append({"plan_idx": idx, "id": next_id, "sha256": sha, "width": w, "height": h})
                next_id += 1
        errors.extend(info["errors"])
        for d in info["dups"]:
            dup_of[d["plan_idx"]] = (
                ("id", d["same_as_id"]) if "same_as_id" in d else ("plan", d["same_as_plan"])
            )
    for idx, (how, target) in dup_of.items():
        image_of[idx] = image_of[target] if how == "plan" else target
    n_texts = len(plan["texts"])
    return _Ids(kept, image_of, dup_of, errors, list(range(next_id, next_id + n_texts)), next_id + n_texts)


def _write_segment(
    seg_tmp: Path, wdir: Path, plan: dict[str, Any], bundle: Encoder, opts: BuildOptions, ids: _Ids
) -> tuple[dict[str, Any], Vectors]:
    """Stream the shards into a segment at ``seg_tmp``; return its info and the new (ids, embeddings)."""
    writer = SegmentWriter(
        seg_tmp,
        n_images=len(ids.kept),
        n_texts=len(plan["texts"]),
        embed_dim=bundle.embed_dim,
        image_tokens_shape=tuple(bundle.image_tokens_shape),
        text_len=bundle.max_tokens,
        text_width=bundle.text_width,
        token_dtype=opts.token_dtype,
        text_features=opts.text_features,
    )
    vecs: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    pos = 0
    for s in range(plan["n_image_shards"]):
        with np.load(shard_path(wdir, "image", s), allow_pickle=False) as z:
            m = len(z["plan_idx"])
            row_ids = np.array([ids.kept[pos + j]["id"] for j in range(m)], dtype=np.int64)
            writer.add_images(row_ids, z["emb"], z["tokens"], z["scales"] if "scales" in z.files else None)
            vecs["image"].append(np.asarray(z["emb"]))
            pos += m
    for s in range(plan["n_text_shards"]):
        with np.load(shard_path(wdir, "text", s), allow_pickle=False) as z:
            row_ids = np.array([ids.text_ids[i] for i in z["plan_idx"].tolist()], dtype=np.int64)
            writer.add_texts(
                row_ids, z["emb"], z["token_ids"], z["mask"], z["tokens"] if "tokens" in z.files else None
            )
            vecs["text"].append(np.asarray(z["emb"]))
    seg_info = writer.close()
    new = {
        "image": (
            np.array([k["id"] for k in ids.kept], dtype=np.int64),
            np.concatenate(vecs["image"]) if vecs["image"] else None,
        ),
        "text": (
            np.array(ids.text_ids, dtype=np.int64),
            np.concatenate(vecs["text"]) if vecs["text"] else None,
        ),
    }
    return seg_info, new


def _metadata_rows(plan: dict[str, Any], ids: _Ids, seg_name: str) -> list[dict[str, Any]]:
    images = plan["images"]
    rows = []
    for row, k in enumerate(ids.kept):
        img = images[k["plan_idx"]]
        rows.append(
            {
                "id": k["id"],
                "kind": "image",
                "path": img["path"],
                "caption": img["caption"],
                "width": k["width"],
                "height": k["height"],
                "sha256": k["sha256"],
                "metadata": img["metadata"],
                "image_id": None,
                "source": img["source"],
                "segment": seg_name,
                "row": row,
            }
        )
    for row, t in enumerate(plan["texts"]):
        img_idx = t["image"]
        rows.append(
            {
                "id": ids.text_ids[row],
                "kind": "text",
                "path": images[img_idx]["path"] if img_idx is not None else None,
                "caption": t["caption"],
                "width": None,
                "height": None,
                "sha256": t["sha256"],
                "metadata": t["metadata"],
                "image_id": ids.image_of.get(img_idx) if img_idx is not None else None,
                "source": t["source"],
                "segment": seg_name,
                "row": row,
            }
        )
    return rows


def _build_report(
    plan: dict[str, Any], ids: _Ids, operation: str, seg_info: dict[str, Any], timing: dict[str, Any]
) -> dict[str, Any]:
    images, texts, skipped = plan["images"], plan["texts"], plan["skipped_texts"]
    enc_items, enc_s = timing["encoded_items"], timing["encode_s"]
    return {
        "operation": operation,
        "sources": plan["sources"],
        "resumed": timing["resumed"],
        "images": {
            "planned": len(images),
            "indexed": len(ids.kept),
            "duplicates": len(ids.dup_of),
            "failed": len(ids.errors),
        },
        "texts": {"planned": len(texts) + len(skipped), "indexed": len(texts), "skipped": len(skipped)},
        "failed": ids.errors,
        "duplicate_images": [
            {"path": images[i]["path"], "same_as_id": ids.image_of[i]} for i in sorted(ids.dup_of)
        ],
        "skipped_texts": skipped,
        "seconds": {"encode": round(enc_s, 3)},
        "throughput": {
            "items_encoded_this_run": enc_items,
            "items_per_s": round(enc_items / enc_s, 2) if enc_s > 0 else None,
        },
        "shards": {"image": plan["n_image_shards"], "text": plan["n_text_shards"]},
        "executor": timing.get("executor", {"name": "local"}),
        "items_done_before_this_run": timing["done_before"],
        "segment": seg_info,
    }


# ---------------------------------------------------------------------------------------------------
# every change


def publish_version(
    change: VersionChange,
    conn: Any,
    opts: BuildOptions,
    report: dict[str, Any],
    *,
    t0: float,
    t_pub: float | None = None,
) -> dict[str, Any]:
    """FAISS update + manifest + report into ``change.tmp`` (closing ``conn``, its meta.sqlite), then rename it
    to ``versions/<version>`` and move the pointer. Returns the manifest."""
    t_pub = t_pub or time.perf_counter()
    index_dir, tmp, parent = change.index_dir, change.tmp, change.parent
    vecs = {k: _gather_vectors(index_dir, conn, k) for k in KINDS}
    conn.close()
    ann_entries: dict[str, Any] = {}
    for kind in KINDS:
        other = vecs["text" if kind == "image" else "image"][1]
        ann_entries[kind] = update_ann(
            kind,
            tmp,
            change.base_dir,
            parent.get("ann", {}).get(kind),
            opts,
            vecs[kind],
            change.new.get(kind),
            change.removed.get(kind),
            other,
        )
    counts = {k: len(vecs[k][0]) for k in KINDS}
    bundle_id, bundle_info = _bundle_entry(change)
    manifest = {
        "format": "albef-index",
        "format_version": layout.FORMAT_VERSION,
        "version": change.version,
        "parent": parent.get("version"),
        "operation": change.operation,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bundle_id": bundle_id,
        "bundle": bundle_info,
        "counts": counts,
        "next_id": change.next_id,
        "segments": change.segments,
        "features": parent["features"],
        "ann": ann_entries,
        "keep_versions": opts.keep_versions,
        "max_memory": opts.max_memory,
    }
    manifest["bytes_per_item"] = _bytes_per_item(index_dir, tmp, manifest)
    report["seconds"]["publish"] = round(time.perf_counter() - t_pub, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    manifest["report"] = {k: report[k] for k in ("operation",) if k in report}
    layout.write_json_atomic(tmp / "report.json", report)
    layout.write_json_atomic(tmp / "manifest.json", manifest)
    atomic.publish_dir(tmp, layout.versions_dir(index_dir) / change.version)
    layout.set_current(index_dir, change.version)
    log.info(
        "published",
        extra={"index": str(index_dir), "version": change.version, "operation": change.operation, **counts},
    )
    return manifest


def _bundle_entry(change: VersionChange) -> tuple[str, dict[str, Any]]:
    """(bundle_id, what the manifest records of the bundle): the encoding one's, else the parent's."""
    bundle = change.bundle
    if bundle is None:
        return change.parent["bundle_id"], change.parent["bundle"]
    info = {
        "embed_dim": bundle.embed_dim,
        "image_res": bundle.image_res,
        "image_tokens_shape": list(bundle.image_tokens_shape),
        "text_width": bundle.text_width,
        "max_tokens": bundle.max_tokens,
        "name": getattr(getattr(bundle, "config", None), "name", None),
        "path": str(Path(bundle.path).resolve()) if getattr(bundle, "path", None) else None,
    }
    return bundle.bundle_id, info


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
        per = {
            name.removeprefix(f"{kind}_"): round(b / max(rows[kind], 1), 1) for name, b in parts[kind].items()
        }
        per["faiss"] = round(faiss_b / n, 1)
        per["sqlite"] = round(meta_bytes / n_all, 1)
        per["total"] = round((totals[kind] + faiss_b) / n + meta_bytes / n_all, 1)
        out[kind] = per
    return out
