"""Step 1 of a build/add: sources -> the plan (``work/pending/plan.json``, written once).

Sources are read into an ordered list of images (unique by path) and texts (unique by cleaned caption, and
not yet in the index). The plan fixes everything an interrupted build needs to resume with the same result:
the items, their order and the options that change the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from albef.index import layout, metadata
from albef.index.errors import ResumeError, SourceError
from albef.index.options import BuildOptions, Encoder
from albef.index.sources import read_sources

log = logging.getLogger(__name__)


def make_plan(
    index_dir: Path, bundle: Encoder, sources: Sequence[str | Path], opts: BuildOptions, base: str | None
) -> dict[str, Any]:
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
                images.append(
                    {
                        "path": rec.image,
                        "caption": rec.captions[0] if rec.captions else None,
                        "metadata": rec.metadata,
                        "source": rec.source,
                    }
                )
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
                skipped.append(
                    {"caption": cap, "reason": "duplicate", "same_as": known_text[sha], "source": rec.source}
                )
                continue
            if sha in text_seen:
                skipped.append(
                    {
                        "caption": cap,
                        "reason": "duplicate",
                        "same_as_plan": text_seen[sha],
                        "source": rec.source,
                    }
                )
                continue
            text_seen[sha] = len(texts)
            texts.append(
                {
                    "caption": cap,
                    "sha256": sha,
                    "image": img_idx,
                    "metadata": rec.metadata,
                    "source": rec.source,
                }
            )
    if not images and not texts:
        raise SourceError(
            "nothing to index: the sources hold no images, and no captions that are not indexed already"
        )
    return {
        "format": 1,
        "base_version": base,
        "bundle_id": bundle.bundle_id,
        "sources": [str(Path(s).resolve()) for s in sources],
        "options": opts.plan_key(),
        "images": images,
        "texts": texts,
        "skipped_texts": skipped,
        "n_image_shards": -(-len(images) // opts.shard_size),
        "n_text_shards": -(-len(texts) // opts.text_shard_size),
    }


def open_work(
    index_dir: Path,
    bundle: Encoder,
    sources: Sequence[str | Path],
    opts: BuildOptions,
    base: str | None,
    resume: bool,
    restart: bool,
) -> tuple[Path, dict[str, Any], bool]:
    """The work folder of this build/add: a fresh plan, or the interrupted one when resuming."""
    wdir = layout.work_dir(index_dir) / "pending"
    request = {
        "base_version": base,
        "bundle_id": bundle.bundle_id,
        "sources": [str(Path(s).resolve()) for s in sources],
        "options": opts.plan_key(),
    }
    plan_file = wdir / "plan.json"
    if plan_file.is_file() and not restart:
        plan = json.loads(plan_file.read_text())
        old = {k: plan.get(k) for k in request}
        if not resume:
            raise ResumeError(
                f"an interrupted build/add is pending in {wdir}: pass --resume to continue it "
                "or --restart to discard it"
            )
        if old != request:
            diff = sorted(k for k in request if old[k] != request[k])
            raise ResumeError(
                f"--resume: the pending build differs in {', '.join(diff)}; "
                "repeat the original command or pass --restart"
            )
        return wdir, plan, True
    if wdir.exists():
        shutil.rmtree(wdir)
    if resume:
        log.info("nothing to resume; starting a new build", extra={"index": str(index_dir)})
    plan = make_plan(index_dir, bundle, sources, opts, base)
    (wdir / "shards").mkdir(parents=True)
    layout.write_json_atomic(plan_file, plan)
    return wdir, plan, False
