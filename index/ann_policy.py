"""Which FAISS index a new version gets, and whether the parent's file is patched or rebuilt.

The factory is, in order: the one given with ``--factory`` (pinned from then on), the parent's pinned one,
else :func:`albef.index.ann.choose` under the memory budget. The parent's index is reused when its factory
is still the choice: removed ids are taken out (HNSW cannot remove: rebuilt), new vectors are added, and a
count that disagrees with the metadata means a rebuild. The search parameters are tuned afresh each time; for
an index with lossy codes (:func:`albef.index.ann.lossy`) that includes the re-score factor, and the recall
recorded is the one after re-scoring from the stored embeddings (``entry["rescore"]`` holds the factor, the
codes' own recall and the embeddings' bytes, which stay memory-mapped outside the FAISS budget).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from albef.index import ann
from albef.index.options import BuildOptions

log = logging.getLogger(__name__)


def update_ann(
    kind: str,
    tmp: Path,
    base_dir: Path | None,
    prev: dict[str, Any] | None,
    opts: BuildOptions,
    live: tuple[np.ndarray, np.ndarray],
    new: tuple[np.ndarray, np.ndarray | None] | None,
    removed: np.ndarray | None,
    other: np.ndarray,
) -> dict[str, Any]:
    """Write ``tmp/<kind>.faiss`` over the ``live`` (ids, vectors); return its manifest entry. ``other``: the
    other kind's vectors, the queries the search parameters are tuned on."""
    ids, vectors = live
    n = len(ids)
    if n == 0:
        return {"factory": None, "ntotal": 0, "file": None}
    d = vectors.shape[1]
    pinned = bool(opts.factory) or bool(prev and prev.get("pinned"))
    if opts.factory:
        factory, reason, est = opts.factory, "given with --factory", ann.estimate_bytes(opts.factory, n, d)
    elif prev and prev.get("pinned"):
        factory, reason, est = (
            prev["factory"],
            prev.get("reason", "pinned"),
            ann.estimate_bytes(prev["factory"], n, d),
        )
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
    entry = ann.tune(
        index, factory, vectors, ids, queries=other if len(other) else None, target_recall=opts.target_recall
    )
    path = tmp / f"{kind}.faiss"
    ann.write(index, path)
    entry.update(
        file=path.name,
        file_bytes=path.stat().st_size,
        reason=reason,
        est_bytes=est,
        pinned=pinned,
        update=how,
        max_memory=opts.max_memory,
    )
    return entry
