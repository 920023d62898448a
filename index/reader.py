"""Read side of an index, for the service. Torch-free (numpy, faiss, sqlite3).

Reader API::

    reader = IndexReader.open(index_dir, bundle_id=None, version=None)   # current version by default
    reader.version: str            # e.g. "000003"
    reader.manifest: dict          # versions/<v>/manifest.json
    reader.index_dir: Path
    reader.count(kind) -> int                                  # kind: "image" | "text"
    reader.search(kind, queries [Q,D] float32, k) -> (scores [Q,k] float32, ids [Q,k] int64)
    reader.search_filtered(kind, query [D], k, filter, exclude=()) -> FilteredHits   # filters.Filter
    reader.matching(kind, filter) -> ids [m] int64             # the items of kind the filter holds for
    reader.vector(kind, item_id) -> [D] float32                # the stored ITC embedding
    reader.image_tokens(ids, dtype=float32) -> [k,N,W]        # ITM re-rank features of images (None: as stored)
    reader.text_features(ids, dtype=float32) -> ([k,L,H], mask [k,L] int64)   # ITM re-rank features of texts
    reader.text_token_ids(ids) -> (ids [k,L] int64, mask [k,L] int64)
    reader.item(item_id) -> dict | None   # id, kind, path, caption, width, height, sha256, metadata,
                                          # image_id (text: its paired image), source
    reader.items(ids) -> list[dict]       # in the order of ids; unknown ids are left out
    reader.image_path(item_id) -> Path | None   # only local image files that the index holds
    reader.close()
    current_version(index_dir) -> str | None    # cheap; poll it to hot-swap readers

- ``search`` queries the FAISS index of ``kind`` ("image": text->image, the query is a text embedding;
  "text": image->text). Ids are int64 and unique across both kinds. Rows are ordered by score descending,
  then id ascending (deterministic ties); missing results are padded with score -inf and id -1. Scores are
  exact ITC scores whatever the index type: an index with lossy codes (IVF-PQ, SQ, ...;
  :func:`albef.index.ann.lossy`) is searched for ``ceil(factor * k)`` candidates (the factor tuned at build,
  ``manifest["ann"][kind]["rescore"]``) and they are re-scored from the memory-mapped stored embeddings
  (:func:`albef.index.ann.search_rescored`), in both ``search`` and ``search_filtered``.
- ``search_filtered`` returns the top k of the items the filter (:mod:`albef.index.filters`, evaluated in
  SQLite) holds for, minus ``exclude``, in the same order, with how many items matched. The ranking is the
  exact ITC score (inner product of the stored embeddings) whatever the index type: a Flat index is searched
  with the matching ids as a FAISS ``IDSelector`` (the same scores as an unfiltered search); for HNSW/IVF,
  up to ``filter_exact_max`` matches are scored by brute force over their stored vectors. Only a larger
  match set of an ANN index is searched in the ANN with the selector (``exact=False``: as approximate as an
  unfiltered search); where that finds fewer than k, efSearch/nprobe are widened (x4, at most
  ``WIDEN_STEPS`` times), then brute force takes over. Match sets are cached per filter (LRU).
- ``open(bundle_id=...)`` raises :class:`IndexMismatchError` when the index was built with another model
  bundle; :class:`IndexNotFoundError` when there is no index/version. Feature lookups raise ``KeyError`` for
  ids that are not items of that kind.
- An index built with ``text_features="ids"`` stores only token ids for texts; ``text_features`` then
  re-encodes them with the ``encoder`` passed to ``open`` (anything with ``encode_ids(ids, mask)``, e.g.
  ``albef.model.runtime.Bundle``).
- A reader is bound to one immutable version and is thread-safe. To follow updates, poll
  :func:`current_version` and open a new reader when it changes; the old one keeps working until closed
  (files of pruned versions stay readable while open/mapped).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from albef.index import ann, filters, layout, metadata
from albef.index.errors import IndexFormatError
from albef.index.features import Segment
from albef.index.layout import current_version
from albef.model.ranking import rank

__all__ = ["FILTER_EXACT_MAX", "FilteredHits", "IndexReader", "current_version"]

Kind = Literal["image", "text"]
_KINDS = ("image", "text")
FILTER_EXACT_MAX = 50_000  # an ANN index scores at most this many matching items by brute force
WIDEN_STEPS = 3  # times a filtered ANN search that found fewer than k raises efSearch/nprobe (x4 each)
_CACHE_ITEMS = 2_000_000  # matching ids kept across the cached filters of a reader
_CHUNK = 65_536  # rows per brute-force block


@dataclass(frozen=True)
class FilteredHits:
    """A filtered search: ``ids``/``scores`` in ranking order (score descending, ties by id ascending);
    ``matched``: items of the kind the filter holds for (before ``exclude``); ``exact``: every match was
    scored, so these are the exact top k (False: candidates from the ANN index searched with the matching ids
    as a selector; their scores are exact ITC scores all the same, re-scored where the codes are lossy)."""

    scores: np.ndarray
    ids: np.ndarray
    matched: int
    exact: bool


@dataclass(frozen=True)
class _Matches:
    ids: np.ndarray  # int64 [m], ascending
    segments: tuple[str, ...]
    seg: np.ndarray  # int32 [m]: index into segments
    rows: np.ndarray  # int64 [m]: row in that segment


class IndexReader:
    def __init__(
        self,
        index_dir: Path,
        version: str,
        manifest: dict[str, Any],
        encoder: Any | None = None,
        search_threads: int | None = None,
        filter_exact_max: int = FILTER_EXACT_MAX,
    ) -> None:
        self.index_dir = index_dir
        self.filter_exact_max = int(filter_exact_max)
        self._matches: OrderedDict[tuple[str, str], _Matches] = OrderedDict()
        self.search_threads = (
            search_threads  # OpenMP threads per FAISS search (None: albef.index.ann's default)
        )
        self.version = version
        self.manifest = manifest
        self.encoder = encoder
        vdir = layout.versions_dir(index_dir) / version
        self._lock = threading.Lock()
        self._conn = metadata.connect_readonly(vdir / "meta.sqlite")
        # Filters scan the table on a connection of their own, so that a long scan does not hold up lookups.
        self._filter_lock = threading.Lock()
        self._filter_conn = metadata.connect_readonly(vdir / "meta.sqlite")
        self._indexes: dict[str, Any] = {}
        for kind in _KINDS:
            entry = manifest["ann"].get(kind) or {}
            if entry.get("file"):
                idx = ann.read(vdir / entry["file"])
                ann.set_params(idx, entry.get("params") or {})
                self._indexes[kind] = idx
        self._segments: dict[str, Segment] = {}
        self._id_maps: dict[str, list[tuple[str, np.ndarray, np.ndarray | None]]] = {}
        self._all_live: dict[str, bool] = {}
        self._rescore = {kind: ann.rescore_factor(manifest["ann"].get(kind)) for kind in _KINDS}
        self.embed_dim = int(manifest["bundle"]["embed_dim"])
        self.image_tokens_shape = tuple(manifest["bundle"]["image_tokens_shape"])
        self.text_shape = (int(manifest["bundle"]["max_tokens"]), int(manifest["bundle"]["text_width"]))

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        bundle_id: str | None = None,
        version: str | None = None,
        encoder: Any | None = None,
        search_threads: int | None = None,
        filter_exact_max: int = FILTER_EXACT_MAX,
    ) -> IndexReader:
        index_dir = Path(index_dir)
        vdir = layout.version_path(index_dir, version)
        manifest = layout.read_manifest(vdir)
        if manifest.get("format") != "albef-index":
            raise IndexFormatError(f"{vdir}: not an albef index manifest")
        layout.check_bundle(manifest, bundle_id, f"{index_dir} (version {vdir.name})")
        return cls(index_dir, vdir.name, manifest, encoder, search_threads, filter_exact_max)

    # -- counts and search -------------------------------------------------------------------------------
    def count(self, kind: Kind) -> int:
        _check_kind(kind)
        return int(self.manifest["counts"][kind])

    def search(self, kind: Kind, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _check_kind(kind)
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.embed_dim:
            raise ValueError(f"queries must be [Q, {self.embed_dim}], got {list(q.shape)}")
        if int(k) < 1:
            raise ValueError("k must be at least 1")
        index = self._indexes.get(kind)
        if index is None:
            return (np.full((q.shape[0], k), -np.inf, np.float32), np.full((q.shape[0], k), -1, np.int64))
        return self._ann_search(kind, index, q, int(k))

    def _ann_search(
        self, kind: Kind, index: Any, q: np.ndarray, k: int, params: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS search of ``kind``; re-scored from the stored embeddings where its codes are lossy."""
        factor = self._rescore[kind]
        if factor is None:
            return ann.search(index, q, k, threads=self.search_threads, params=params)
        return ann.search_rescored(
            index, q, k, factor, lambda ids: self._embeddings(kind, ids), self.search_threads, params
        )

    # -- filtered search -----------------------------------------------------------------------------------
    def matching(self, kind: Kind, flt: filters.Filter) -> np.ndarray:
        """Ids (int64, ascending) of the items of ``kind`` that ``flt`` holds for."""
        return self._match(kind, flt).ids

    def search_filtered(
        self, kind: Kind, query: np.ndarray, k: int, flt: filters.Filter, exclude: Sequence[int] = ()
    ) -> FilteredHits:
        _check_kind(kind)
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.embed_dim:
            raise ValueError(f"query must be [{self.embed_dim}], got {list(np.shape(query))}")
        if int(k) < 1:
            raise ValueError("k must be at least 1")
        found = self._match(kind, flt)
        keep = np.ones(len(found.ids), bool)
        if len(exclude):
            keep &= ~np.isin(found.ids, np.asarray(list(exclude), dtype=np.int64))
        allowed = found.ids[keep]
        fam = ann.family((self.manifest["ann"].get(kind) or {}).get("factory") or "Flat")
        index = self._indexes.get(kind)
        if len(allowed) == 0 or index is None:
            return FilteredHits(np.zeros(0, np.float32), np.zeros(0, np.int64), len(found.ids), True)
        if fam == "flat" or (fam != "other" and len(allowed) > self.filter_exact_max):
            hits = self._selector_search(kind, index, fam, q, int(k), allowed)
            if hits is not None:
                return FilteredHits(hits[0], hits[1], len(found.ids), fam == "flat")
        scores, ids = self._brute_force(kind, q, int(k), found, keep)
        return FilteredHits(scores, ids, len(found.ids), True)

    def _match(self, kind: Kind, flt: filters.Filter) -> _Matches:
        _check_kind(kind)
        key = (kind, repr(flt))  # repr, not ==: True == 1 in Python, but not in a filter
        with self._lock:
            hit = self._matches.get(key)
            if hit is not None:
                self._matches.move_to_end(key)
                return hit
        with self._filter_lock:
            rows = metadata.matching(self._filter_conn, kind, flt)
        names = tuple(sorted({seg for _, seg, _ in rows}))
        pos = {name: i for i, name in enumerate(names)}
        found = _Matches(
            np.fromiter((i for i, _, _ in rows), np.int64, len(rows)),
            names,
            np.fromiter((pos[seg] for _, seg, _ in rows), np.int32, len(rows)),
            np.fromiter((r for _, _, r in rows), np.int64, len(rows)),
        )
        with self._lock:
            self._matches[key] = found
            while len(self._matches) > 1 and sum(len(m.ids) for m in self._matches.values()) > _CACHE_ITEMS:
                self._matches.popitem(last=False)
        return found

    def _selector_search(
        self, kind: Kind, index: Any, fam: str, q: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The index searched with ``allowed`` as its id selector (re-scored where its codes are lossy),
        widened when it finds fewer than ``min(k, len(allowed))``; None if even the widest search does."""
        sel = ann.faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        want = min(k, len(allowed))
        try:
            base = _search_knob(index, fam)
        except (AttributeError, RuntimeError):  # an index layout this code does not know: brute force
            return None
        for step in range(WIDEN_STEPS + 1 if fam != "flat" else 1):
            params = _selector_params(index, fam, sel, None if base is None else base * 4**step)
            scores, ids = self._ann_search(kind, index, q[None, :], k, params)
            if int((ids[0] >= 0).sum()) >= want:
                n = want
                return scores[0, :n].copy(), ids[0, :n].copy()
        return None

    def _brute_force(
        self, kind: Kind, q: np.ndarray, k: int, found: _Matches, keep: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact ITC scores of the kept matches from their stored vectors; the top ``k`` by the ranking rule."""
        ids, seg, rows = found.ids[keep], found.seg[keep], found.rows[keep]
        scores = np.empty(len(ids), np.float32)
        for si, name in enumerate(found.segments):
            where = np.flatnonzero(seg == si)
            emb = self._segment(name).array(f"{kind}_emb")
            for a in range(0, len(where), _CHUNK):
                part = where[a : a + _CHUNK]
                scores[part] = np.asarray(emb[rows[part]], dtype=np.float32) @ q
        if len(ids) > 4 * k:  # keep everything that ties with the k-th best, rank only those
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            top = np.flatnonzero(scores >= kth)
            ids, scores = ids[top], scores[top]
        order = rank(scores, ids, k)
        return scores[order], ids[order]

    # -- per-item arrays -----------------------------------------------------------------------------------
    def _segment(self, name: str) -> Segment:
        seg = self._segments.get(name)
        if seg is None:
            with self._lock:
                seg = self._segments.get(name)
                if seg is None:
                    seg = Segment(layout.segments_dir(self.index_dir) / name)
                    self._segments[name] = seg
        return seg

    def _parts(self, kind: str, ids: Sequence[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Where the live items ``ids`` are: per segment, (name, positions in ``ids``, rows), or ``KeyError``
        naming ids that are not live items of ``kind`` in this version. When the version has no deleted rows
        (its live count is every segment row, as after builds and adds) the segments' own id arrays answer
        (no SQLite, no lock: 10-20 us for a re-rank head instead of 50-150); else SQLite's locations."""
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._every_row_live(kind):
            return self._segment_rows(kind, want)
        with self._lock:
            locs = metadata.locations(self._conn, kind, want.tolist())
        missing = [i for i in want.tolist() if i not in locs]
        if missing:
            raise KeyError(f"not {kind} items of this index: {missing[:10]}")
        by_seg: dict[str, tuple[list[int], list[int]]] = {}
        for pos, i in enumerate(want.tolist()):
            seg, row = locs[i]
            where, rows = by_seg.setdefault(seg, ([], []))
            where.append(pos)
            rows.append(row)
        return [(seg, np.array(w, np.int64), np.array(r, np.int64)) for seg, (w, r) in by_seg.items()]

    def _every_row_live(self, kind: str) -> bool:
        """Whether every segment row of ``kind`` is a live item of this version (no deletions since)."""
        live = self._all_live.get(kind)
        if live is None:
            rows = sum(int(self._segment(n).info[f"n_{kind}s"]) for n in self.manifest["segments"])
            live = rows == int(self.manifest.get("counts", {}).get(kind, -1))
            self._all_live[kind] = live
        return live

    def _segment_rows(self, kind: str, want: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, positions in ``want``, rows) per segment by the segments' own id arrays; ``KeyError`` for ids
        no segment holds. A deleted item's row is still in its segment: callers check liveness first."""
        parts: list[tuple[str, np.ndarray, np.ndarray]] = []
        todo = np.ones(len(want), bool)
        for name, sorted_ids, order in self._id_map(kind):  # type: ignore[arg-type]
            if not todo.any():
                break
            cand = np.flatnonzero(todo)
            pos = np.minimum(np.searchsorted(sorted_ids, want[cand]), len(sorted_ids) - 1)
            hit = sorted_ids[pos] == want[cand]
            if not hit.any():
                continue
            parts.append((name, cand[hit], pos[hit] if order is None else order[pos[hit]]))
            todo[cand[hit]] = False
        if todo.any():
            raise KeyError(f"not {kind} items of this index: {want[todo][:10].tolist()}")
        return parts

    def _gather(self, kind: str, ids: Sequence[int], fetch: Any) -> np.ndarray:
        """Rows of each id in the order given, stacked: one fancy-index read per segment, written into place
        (with one segment, as most indexes have, the read is already the answer)."""
        parts = self._parts(kind, ids)
        if len(parts) == 1:
            return np.asarray(fetch(self._segment(parts[0][0]), parts[0][2]))
        out: np.ndarray | None = None
        for seg, where, rows in parts:
            block = np.asarray(fetch(self._segment(seg), rows))
            if out is None:
                out = np.empty((len(ids), *block.shape[1:]), block.dtype)
            out[where] = block
        assert out is not None  # callers return early for no ids
        return out

    def _embeddings(self, kind: Kind, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored ITC embeddings float32 [m, D] of ``ids``, in the order given: rows of the memory-mapped
        ``<kind>_emb.npy`` of this version's segments, found by the segments' own id arrays (no SQLite, no
        lock), for re-scoring a lossy index's candidates. It does not check that an item is live in this
        version (a deleted item's row is still in its segment; a search never names one): ``KeyError`` only
        for ids no segment holds. :meth:`vector` is the checked lookup."""
        _check_kind(kind)
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(want), self.embed_dim), np.float32)
        for name, where, rows in self._segment_rows(kind, want):
            out[where] = self._segment(name).array(f"{kind}_emb")[rows]
        return out

    def _id_map(self, kind: Kind) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """Per segment of this version: (name, its ids of ``kind`` ascending, the rows in that order or None
        when the rows are in id order already, as a build writes them). Rows of deleted items are in it; a
        search never names them."""
        found = self._id_maps.get(kind)
        if found is None:
            found = []
            for name in self.manifest["segments"]:
                sid = self._segment(name).array(f"{kind}_ids")
                if len(sid) == 0:
                    continue
                if bool(np.all(sid[1:] > sid[:-1])):
                    found.append((name, sid, None))
                else:
                    order = np.argsort(sid, kind="stable")
                    found.append((name, np.asarray(sid[order]), order))
            with self._lock:
                self._id_maps[kind] = found
        return found

    def vector(self, kind: Kind, item_id: int) -> np.ndarray:
        _check_kind(kind)
        (row,) = self._gather(kind, [item_id], lambda s, r: s.array(f"{kind}_emb")[r])
        return np.array(row, dtype=np.float32)

    def image_tokens(self, ids: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        """The ITM features ``[k, N, W]`` of images, in ``dtype``; ``dtype=None`` returns them as stored
        (float16, or float32 dequantised from int8), for a consumer that casts them itself: the model
        runtime does it in ONNX Runtime, about ten times faster than numpy's float16 conversion."""
        n, w = self.image_tokens_shape
        if len(ids) == 0:
            return np.zeros((0, n, w), dtype or np.float32)
        return _as(self._gather("image", ids, lambda s, r: s.image_tokens(r)), dtype)

    def text_token_ids(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        length = self.text_shape[0]
        if len(ids) == 0:
            return np.zeros((0, length), np.int64), np.zeros((0, length), np.int64)
        tok = self._gather("text", ids, lambda s, r: s.array("text_token_ids")[r]).astype(np.int64)
        mask = self._gather("text", ids, lambda s, r: s.array("text_mask")[r]).astype(np.int64)
        return tok, mask

    def text_features(self, ids: Sequence[int], dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """The ITM features of texts: (tokens ``[k, L, H]`` in ``dtype``, mask ``[k, L]`` int64);
        ``dtype=None`` returns the tokens as stored (float16), see :meth:`image_tokens`."""
        length, width = self.text_shape
        if len(ids) == 0:
            return np.zeros((0, length, width), dtype or np.float32), np.zeros((0, length), np.int64)
        if self.manifest["features"]["text_features"] == "tokens":
            tok = self._gather("text", ids, lambda s, r: s.array("text_tokens")[r])
            mask = self._gather("text", ids, lambda s, r: s.array("text_mask")[r]).astype(np.int64)
            return _as(tok, dtype), mask
        if self.encoder is None:
            raise IndexFormatError(
                "this index stores text token ids only; open it with encoder=<bundle> "
                "to re-encode them for re-ranking"
            )
        tid, mask = self.text_token_ids(ids)
        _, tok = self.encoder.encode_ids(tid, mask)
        return _as(np.asarray(tok), dtype), mask

    # -- metadata ---------------------------------------------------------------------------------------
    def item(self, item_id: int) -> dict[str, Any] | None:
        found = self.items([item_id])
        return found[0] if found else None

    def items(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        ids = [int(i) for i in ids]
        with self._lock:
            found = metadata.items(self._conn, ids)
        return [found[i] for i in ids if i in found]

    def image_path(self, item_id: int) -> Path | None:
        it = self.item(item_id)
        if it is None or it["kind"] != "image" or not it["path"] or "://" in it["path"]:
            return None
        return Path(it["path"])

    def close(self) -> None:
        with self._filter_lock:
            self._filter_conn.close()
        with self._lock:
            self._conn.close()
            self._indexes.clear()
            self._segments.clear()
            self._id_maps.clear()

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.manifest["counts"]
        return f"IndexReader({str(self.index_dir)!r}, version={self.version}, images={c['image']}, texts={c['text']})"


def _search_knob(index: Any, fam: str) -> int | None:
    """The index's efSearch (HNSW) or nprobe (IVF) as tuned, or None (Flat)."""
    if fam == "hnsw":
        return int(ann.faiss.downcast_index(index.index).hnsw.efSearch)
    if fam.startswith("ivf"):
        return int(ann.faiss.extract_index_ivf(index).nprobe)
    return None


def _selector_params(index: Any, fam: str, sel: Any, knob: int | None) -> Any:
    faiss = ann.faiss
    if fam == "hnsw":
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(knob or 16))
    if fam.startswith("ivf"):
        nlist = int(faiss.extract_index_ivf(index).nlist)
        return faiss.SearchParametersIVF(sel=sel, nprobe=min(int(knob or 1), nlist))
    return faiss.SearchParameters(sel=sel)


def _as(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``x`` in ``dtype`` (no copy when it already is), or as it is for ``dtype=None``."""
    return x if dtype is None else x.astype(dtype, copy=False)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
