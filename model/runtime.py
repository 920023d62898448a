"""The torch-free runtime: a model bundle (see ``albef.model.export``) run with ONNX Runtime only.

Preprocessing is PIL/numpy (:mod:`albef.model.image`), tokenization is ``tokenizers``
(:mod:`albef.model.text`). Nothing here imports torch, so the index builder and the service can run
without it. Every output is float32 numpy; float16 inputs are accepted and cast (large ones by ONNX Runtime).

Bundle layout (``manifest.json`` lists every file with its sha256)::

    image_encoder.onnx   pixels [B,3,R,R]                       -> image_emb [B,D], image_tokens [B,N,W]
    text_encoder.onnx    input_ids, attention_mask [B,L] int64  -> text_emb [B,D], text_tokens [B,L,H]
    itm.onnx             text_tokens, text_mask [B|1,L], image_tokens [B|1,N,W] -> itm_logits [B,2]
    itm_short.onnx       (optional) the same, in the other cross-attention form, for texts of at most
                         manifest["itm_forms"]["itm_short"]["max_length"] tokens
    image_kv.onnx        image_tokens [1,N,W]                   -> k0, v0, k1, v1, ... [1,heads,N,d]
    itm_kv.onnx          text_tokens, text_mask, k0, v0, ...    -> itm_logits [K,2] (K/V batch 1 broadcasts)
    <role>.int8.onnx     the same graphs with int8 dynamically quantised weights
    explain.onnx         text_tokens [1,L,H], text_mask [1,L], image_tokens [1,N,W]
                         -> itm_logits [1,2], attention, attention_grad [1,heads,L,N]
    tokenizer.json, vocab.txt, preprocess.json, manifest.json

Format versions: 1 has the five retrieval graphs; 2 adds the optional ``explain.onnx`` (Grad-CAM of the ITM
match, :mod:`albef.model.export_explain`), described by the manifest's ``explain`` section. The explain graph
is float32 and serves every variant. 3 makes the ITM graphs do only the arithmetic their result needs
(:mod:`albef.model.itm_flops`): the last fusion layer computes [CLS] only, ``itm_kv`` packs the real tokens of
its texts, ``itm`` takes one text for many images and runs the cheaper cross-attention form (``itm_forms`` in
the manifest, plus the optional ``itm_short``). The I/O of every graph is unchanged, so older bundles still
load and serve: their graphs compute the official way, a text is repeated for each image, and they too get
the texts trimmed to the batch's longest real text. A version-1 bundle has no explain graph
(:attr:`Bundle.has_explain` is False).

Trimming: every ITM call drops the trailing columns that are padding in every row before ONNX Runtime sees
them. Padded positions are masked with -10000 in self-attention, whose exponential underflows to exactly 0,
so they contribute nothing to real rows: the logits are those of the padded call up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from albef.model.config import AlbefConfig
from albef.model.image import ImageSource, preprocess
from albef.model.text import AlbefTokenizer

BUNDLE_FORMAT = "albef-bundle"
BUNDLE_FORMAT_VERSION = 3  # 2: the optional explain graph; 3: the ITM forms (versions 1 and 2 still load)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
PREPROCESS_FILE = "preprocess.json"
ROLES = ("image_encoder", "text_encoder", "itm", "image_kv", "itm_kv")
OPTIONAL_ROLES = ("itm_short",)  # format 3: present when the configuration has a second text->image form
VARIANTS = ("fp32", "int8", "bf16")
EXPLAIN_ROLE = "explain"
EXPLAIN_FILE = "explain.onnx"
EXPLAIN_INPUTS = ("text_tokens", "text_mask", "image_tokens")
EXPLAIN_OUTPUTS = ("itm_logits", "attention", "attention_grad")
# float16 -> float32 in ONNX Runtime (one Cast node, shipped with the package, not with a bundle): for the
# features an index stores in float16 it takes 20-30 us where numpy takes 280 (32 x 37 x 128 values;
# 2-7 ms against 24 ms at 32 x 577 x 768). Exact: every float16 is a float32. Below CAST_MIN_VALUES numpy wins.
CAST_GRAPH = Path(__file__).resolve().parent / "graphs" / "cast_f16_f32.onnx"
CAST_ROLE = "cast_f16_f32"
CAST_MIN_VALUES = 4096


class BundleError(ValueError):
    """A bundle that is missing, incomplete, corrupt or lacks the requested variant."""


def variant_file(role: str, variant: str) -> str:
    """File name of one graph: ``itm.onnx`` for fp32, ``itm.int8.onnx`` for the int8 variant."""
    return f"{role}.onnx" if variant == "fp32" else f"{role}.{variant}.onnx"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_id_from_files(files: dict[str, dict[str, Any]]) -> str:
    """The bundle id: sha256 over ``name:sha256`` lines of every file, sorted by name."""
    lines = "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    mpath = p / MANIFEST_FILE
    if not p.is_dir():
        raise BundleError(f"model bundle not found: {p}")
    if not mpath.is_file():
        raise BundleError(f"{p}: not a model bundle (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath}: invalid JSON ({exc})") from exc
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath}: not an {BUNDLE_FORMAT} manifest")
    if int(manifest.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format {manifest.get('format_version')} is newer than this runtime"
        )
    return manifest


def session_options(
    intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, spinning: bool = False
) -> Any:
    """The ONNX Runtime session options of the runtime's sessions (full graph optimisation; thread counts as
    given, else ONNX Runtime's), for anything that must run graphs as the runtime does (benches, experiments).

    Idle intra-op threads sleep unless ``spinning``: a spinning pool keeps a core busy after every run, and on a
    small machine the service's other threads (the next stage, the event loop) then wait for it (measured: a
    served tiny text->image query 7-9 ms spinning, 3.6-3.8 ms not)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        so.inter_op_num_threads = int(inter_op_threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def _as_f32(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.float32:
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"expected floating-point features, got {a.dtype}")
        a = a.astype(np.float32)
    return np.ascontiguousarray(a)


def _as_i64(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
        raise TypeError(f"expected integer ids/mask, got {a.dtype}")
    return np.ascontiguousarray(a.astype(np.int64, copy=False))


def _trim(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the trailing columns that are padding in every row; at least one is kept."""
    cols = np.flatnonzero(mask.any(axis=0))
    length = int(cols[-1]) + 1 if cols.size else 1
    if length == mask.shape[1]:
        return tokens, mask
    return np.ascontiguousarray(tokens[:, :length]), np.ascontiguousarray(mask[:, :length])


class Bundle:
    """A loaded model bundle. Sessions are created lazily (once, under a lock); ``run`` is thread-safe."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        variant: str,
        intra_op_threads: int | None,
        inter_op_threads: int | None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.variant = variant
        self.bundle_id: str = manifest["bundle_id"]
        self.config = AlbefConfig.from_dict(manifest["model"])
        self.embed_dim = int(self.config.embed_dim)
        pre = json.loads((path / PREPROCESS_FILE).read_text())
        self.image_res = int(pre["image_res"])
        self.mean = tuple(float(x) for x in pre["mean"])
        self.std = tuple(float(x) for x in pre["std"])
        self.image_tokens_shape: tuple[int, int] = (
            (self.image_res // self.config.vision.patch_size) ** 2 + 1,
            int(self.config.vision.width),
        )
        self.text_width = int(self.config.text.hidden_size)
        self.max_tokens = int(self.config.max_tokens)
        self.num_kv = 2 * (self.config.text.num_hidden_layers - self.config.text.fusion_layer)
        self.tokenizer = AlbefTokenizer.from_file(path / TOKENIZER_FILE, max_tokens=self.max_tokens)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.spinning = False
        vfiles = manifest["variants"][variant]["files"]
        self._files = {role: vfiles[role] for role in ROLES}
        # Format 3: which text->image graphs there are and for which text lengths (None: an older bundle,
        # whose itm graph repeats the text per image and whose itm_kv computes the padding).
        self.itm_forms: dict[str, Any] | None = manifest.get("itm_forms")
        self._short_max = 0
        if self.itm_forms is not None and "itm_short" in self.itm_forms and "itm_short" in vfiles:
            self._files["itm_short"] = vfiles["itm_short"]
            self._short_max = int(self.itm_forms["itm_short"]["max_length"])
        # The explain graph (format 2; absent from older bundles) is float32 and shared by every variant.
        self.explain_info: dict[str, Any] | None = manifest.get("explain")
        if self.explain_info is not None:
            self._files[EXPLAIN_ROLE] = self.explain_info["file"]
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._vocab: list[str] | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        variant: str = "fp32",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        verify: bool = False,
        eager: bool = False,
        spinning: bool = False,
    ) -> Bundle:
        """Open a bundle. ``verify`` re-hashes every file against the manifest (slow for big models);
        ``eager`` creates all ONNX Runtime sessions now instead of on first use; ``spinning`` lets ONNX
        Runtime's idle intra-op threads spin-wait for work (its default; off here, see :meth:`session`)."""
        p = Path(path)
        manifest = read_manifest(p)
        variants = manifest.get("variants", {})
        if variant not in variants:
            raise BundleError(
                f"{p}: no variant {variant!r} in this bundle (available: {', '.join(variants)})"
            )
        files = manifest.get("files", {})
        needed = [*variants[variant]["files"].values(), TOKENIZER_FILE, PREPROCESS_FILE]
        if manifest.get("explain"):
            needed.append(manifest["explain"]["file"])
        for name in needed:
            f = p / name
            if not f.is_file():
                raise BundleError(f"{p}: missing file {name}")
            if name in files and f.stat().st_size != files[name]["bytes"]:
                raise BundleError(
                    f"{p}: {name} has {f.stat().st_size} bytes, manifest says {files[name]['bytes']}"
                )
            if verify and name in files and sha256_file(f) != files[name]["sha256"]:
                raise BundleError(f"{p}: {name} does not match its sha256 in the manifest")
        if bundle_id_from_files(files) != manifest.get("bundle_id"):
            raise BundleError(f"{p}: bundle_id does not match the files listed in the manifest")
        bundle = cls(p, manifest, variant, intra_op_threads, inter_op_threads)
        bundle.spinning = bool(spinning)
        if eager:
            for role in bundle._files:
                bundle.session(role)
        return bundle

    # -- sessions -------------------------------------------------------------------------------------
    def session(self, role: str) -> Any:
        """The ONNX Runtime session of one graph (created on first use)."""
        sess = self._sessions.get(role)
        if sess is not None:
            return sess
        with self._lock:
            sess = self._sessions.get(role)
            if sess is None:
                import onnxruntime as ort

                so = session_options(self.intra_op_threads, self.inter_op_threads, spinning=self.spinning)
                graph = CAST_GRAPH if role == CAST_ROLE else self.path / self._files[role]
                sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
                self._sessions[role] = sess
        return sess

    def _f32(self, x: Any) -> np.ndarray:
        """Features as contiguous float32; a large float16 array is cast by ONNX Runtime (exact)."""
        a = np.asarray(x)
        if a.dtype == np.float16 and a.size >= CAST_MIN_VALUES:
            (out,) = self.session(CAST_ROLE).run(None, {"x": np.ascontiguousarray(a)})
            return out
        return _as_f32(a)

    def _run(self, role: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.session(role).run(None, feeds)
        return [np.asarray(o, dtype=np.float32) for o in outs]

    # -- images ---------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageSource], *, exif_transpose: bool = True) -> np.ndarray:
        """Images (paths, bytes or PIL) -> float32 pixels ``[B, 3, R, R]``, upright by their EXIF orientation
        unless ``exif_transpose=False`` (the official loader)."""
        return preprocess(images, self.image_res, self.mean, self.std, exif_transpose=exif_transpose)

    def encode_pixels(self, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``[B,3,R,R]`` -> (L2-normalised embeddings ``[B,D]``, token features ``[B,N,W]``)."""
        x = _as_f32(pixels)
        r = self.image_res
        if x.ndim != 4 or x.shape[1:] != (3, r, r):
            raise ValueError(f"pixels must have shape [B, 3, {r}, {r}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32), np.zeros(
                (0, *self.image_tokens_shape), np.float32
            )
        emb, tokens = self._run("image_encoder", {"pixels": x})
        return emb, tokens

    def encode_images(
        self, images: Sequence[ImageSource], batch_size: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        embs, toks = [], []
        for start in range(0, len(images), batch_size):
            e, t = self.encode_pixels(self.preprocess(images[start : start + batch_size]))
            embs.append(e)
            toks.append(t)
        if not embs:
            return self.encode_pixels(np.zeros((0, 3, self.image_res, self.image_res), np.float32))
        return np.concatenate(embs), np.concatenate(toks)

    # -- texts ----------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids, mask) int64 ``[B, max_tokens]`` (cleaned with pre_caption, as the official code)."""
        return self.tokenizer(list(texts) if not isinstance(texts, str) else texts)

    def encode_ids(self, ids: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask ``[B, L]`` -> (L2-normalised embeddings ``[B,D]``, token features ``[B,L,H]``)."""
        i, m = _as_i64(ids), _as_i64(mask)
        if i.ndim != 2 or i.shape != m.shape:
            raise ValueError(f"ids and mask must both be [B, L], got {list(i.shape)} and {list(m.shape)}")
        if i.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32), np.zeros(
                (0, i.shape[1], self.text_width), np.float32
            )
        emb, tokens = self._run("text_encoder", {"input_ids": i, "attention_mask": m})
        return emb, tokens

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Captions -> (embeddings ``[B,D]``, token features ``[B,L,H]``, mask ``[B,L]`` int64)."""
        ids, mask = self.tokenize(texts)
        embs, toks = [], []
        for start in range(0, len(ids), batch_size):
            e, t = self.encode_ids(ids[start : start + batch_size], mask[start : start + batch_size])
            embs.append(e)
            toks.append(t)
        if not embs:
            e, t = self.encode_ids(ids, mask)
            return e, t, mask
        return np.concatenate(embs), np.concatenate(toks), mask

    # -- ITM ------------------------------------------------------------------------------------------
    def _check_text(self, text_tokens: Any, text_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """The text features as given (any float dtype: they are cast after trimming) and the int64 mask."""
        t, m = np.asarray(text_tokens), _as_i64(text_mask)
        if not np.issubdtype(t.dtype, np.floating):
            raise TypeError(f"expected floating-point features, got {t.dtype}")
        if t.ndim != 3 or t.shape[2] != self.text_width or m.shape != t.shape[:2]:
            raise ValueError(
                f"text_tokens must be [B, L, {self.text_width}] with a [B, L] mask, "
                f"got {list(t.shape)} and {list(m.shape)}"
            )
        return t, m

    def _check_image_tokens(self, image_tokens: Any) -> np.ndarray:
        x = self._f32(image_tokens)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or tuple(x.shape[1:]) != self.image_tokens_shape:
            raise ValueError(
                f"image_tokens must be [B, {self.image_tokens_shape[0]}, {self.image_tokens_shape[1]}], "
                f"got {list(x.shape)}"
            )
        return x

    def itm_scores(self, text_tokens: Any, text_mask: Any, image_tokens: Any) -> np.ndarray:
        """ITM logits ``[B, 2]`` of pairs: row i = text i with image i. A batch of 1 on either side is shared
        by the other side's B (one text against B images is the text->image re-rank; format-3 graphs then
        compute the text's first fusion layer once)."""
        t, m = self._check_text(text_tokens, text_mask)
        x = self._check_image_tokens(image_tokens)
        nt, ni = t.shape[0], x.shape[0]
        if nt != ni and 1 not in (nt, ni):
            raise ValueError(f"{nt} texts but {ni} images: pass one of either, or one image per text")
        if min(nt, ni) == 0:
            return np.zeros((0, 2), np.float32)
        t, m = _trim(t, m)
        t = self._f32(t)
        if nt == 1 and ni > 1 and self.itm_forms is None:
            # graphs of older bundles were traced with one text per image
            t, m = np.repeat(t, ni, axis=0), np.repeat(m, ni, axis=0)
        (logits,) = self._run(
            self.itm_role(t.shape[1]), {"text_tokens": t, "text_mask": m, "image_tokens": x}
        )
        return logits

    def itm_role(self, length: int) -> str:
        """The text->image graph a text of ``length`` real tokens runs on (``itm`` or ``itm_short``)."""
        return "itm_short" if 0 < length <= self._short_max else "itm"

    def image_kv(self, image_tokens_1: Any) -> list[np.ndarray]:
        """Cross-attention keys and values of every fusion layer for ONE image ``[1,N,W]``: [k0, v0, k1, ...]."""
        x = self._check_image_tokens(image_tokens_1)
        if x.shape[0] != 1:
            raise ValueError(f"image_kv takes one image ([1, N, W]), got a batch of {x.shape[0]}")
        return self._run("image_kv", {"image_tokens": x})

    def itm_scores_for_image(self, image_tokens_1_or_kv: Any, text_tokens: Any, text_mask: Any) -> np.ndarray:
        """ITM logits ``[K, 2]`` of one image against K candidate texts; the image's K/V are computed once
        (pass them from :meth:`image_kv` to reuse them across calls). Format-3 graphs compute only the texts'
        real tokens, so texts of different lengths cost what they hold; each text's first position ([CLS])
        must be real."""
        if isinstance(image_tokens_1_or_kv, list | tuple):
            kv = [_as_f32(a) for a in image_tokens_1_or_kv]
            if len(kv) != self.num_kv:
                raise ValueError(f"expected {self.num_kv} K/V arrays, got {len(kv)}")
        else:
            kv = self.image_kv(image_tokens_1_or_kv)
        t, m = self._check_text(text_tokens, text_mask)
        if t.shape[0] == 0:
            return np.zeros((0, 2), np.float32)
        if self.itm_forms is not None and not m[:, 0].all():
            raise ValueError("every text must start with a real ([CLS]) token: text_mask[:, 0] must be 1")
        t, m = _trim(t, m)
        feeds = {"text_tokens": self._f32(t), "text_mask": m}
        for i in range(self.num_kv // 2):
            feeds[f"k{i}"], feeds[f"v{i}"] = kv[2 * i], kv[2 * i + 1]
        (logits,) = self._run("itm_kv", feeds)
        return logits

    # -- explain (Grad-CAM of the ITM match) ---------------------------------------------------------------
    @property
    def has_explain(self) -> bool:
        """Whether this bundle has the explain graph (exported with bundle format 2 or later)."""
        return self.explain_info is not None

    def explain(self, text_tokens: Any, text_mask: Any, image_tokens: Any) -> dict[str, np.ndarray]:
        """One pair's Grad-CAM inputs: ``itm_logits`` ``[1,2]``, the cross-attention probabilities of the
        explained fusion layer (``attention``, ``[1,heads,L,N]``, the text's tokens over the image tokens) and
        the gradient of the match logit with respect to them (``attention_grad``). A text shorter than the
        graph's length is padded (padding rows stay masked); a :class:`BundleError` if the bundle has no
        explain graph."""
        if self.explain_info is None:
            raise BundleError(
                f"{self.path}: this bundle has no explain graph (re-export it with albef export)"
            )
        t, m = self._check_text(text_tokens, text_mask)
        t, x = self._f32(t), self._check_image_tokens(image_tokens)
        length = int(self.explain_info["length"])
        if t.shape[0] != 1 or x.shape[0] != 1:
            raise ValueError(f"explain takes one pair, got {t.shape[0]} texts and {x.shape[0]} images")
        n = t.shape[1]
        if n > length:
            raise ValueError(f"the text has {n} tokens; the explain graph takes at most {length}")
        if n < length:
            t = np.concatenate([t, np.zeros((1, length - n, t.shape[2]), np.float32)], axis=1)
            m = np.concatenate([m, np.zeros((1, length - n), np.int64)], axis=1)
        outs = self._run(EXPLAIN_ROLE, {"text_tokens": t, "text_mask": m, "image_tokens": x})
        got = dict(zip(EXPLAIN_OUTPUTS, outs, strict=True))
        got["attention"] = got["attention"][:, :, :n]
        got["attention_grad"] = got["attention_grad"][:, :, :n]
        return got

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of token ids (WordPieces, ``##`` marking a continuation)."""
        if self._vocab is None:
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(self.path / TOKENIZER_FILE)).get_vocab()
            table = [""] * (max(vocab.values()) + 1)
            for token, i in vocab.items():
                table[i] = token
            self._vocab = table
        return [self._vocab[int(i)] if 0 <= int(i) < len(self._vocab) else "[UNK]" for i in ids]

    def validation_summary(self) -> dict[str, Any]:
        """What the export measured for this variant against fp32 (int8: on which CPU, within which bounds),
        for the service's start-up log. Bundles exported before CPU figures were recorded say so."""
        if self.variant == "fp32":
            return {}
        val = self.manifest["variants"][self.variant].get("validation", {})
        if "cpu" not in val:
            return {
                "validated": "no CPU recorded in this bundle's manifest; re-export it to record the figures"
            }
        keep = (
            "image_emb_min_cos",
            "text_emb_min_cos",
            "itm_logits",
            "max_int8_weight",
            "rerank_top1_agreement_t2i",
            "rerank_top1_agreement_i2t",
        )
        return {
            "validated": {k: val[k] for k in keep if k in val},
            "validated_on": {
                "model": val["cpu"].get("model"),
                "flags": val["cpu"].get("flags"),
                "int8_kernel": val["cpu"].get("int8_kernel"),
            },
            "validation_bounds": val.get("bounds"),
        }

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model={self.config.name!r}, variant={self.variant!r}, id={self.bundle_id[:12]})"
