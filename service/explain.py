"""Explain a match: where in the image the text matched, as a Grad-CAM heat map over the patches. Torch-free.

The bundle's explain graph (:mod:`albef.model.export_explain`) gives, for one (text, image) pair, the ITM
logits, the cross-attention probabilities of one fusion layer (each text token over the image tokens) and
the gradient of the match logit with respect to them. Grad-CAM as the official ALBEF code computes it:

- drop the image [CLS] column (keep the patches) and multiply the attention by its gradient clamped at 0;
- average over the attention heads: one map per text token, reshaped to the patch grid (side x side);
- the overall map is the mean of the maps of the text's real tokens, [CLS] included (the official grounding
  evaluation averages over heads, then over the tokens, with padding rows zeroed); the per-word maps
  (``per_word``) are those of the WordPieces after [CLS], as the official notebook shows them.

The overlay (:func:`render_overlay`) follows the official notebook's picture: the map normalised to [0, 1],
resized to the image (bicubic), blurred (Gaussian, sigma 2% of the longer side), normalised again, coloured
with the "jet" colour map and blended over the image with weight ``map ** 0.7``. PIL and numpy only.

:class:`Explainer` runs one request: the query text and image are encoded through the service's
micro-batched stages (shared with search); the explain graph and the rendering run in a worker thread,
bounded like the other stages (a full queue is a 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from albef.service.domain_errors import BadQuery, NotFound, Overloaded, SearchError
from albef.service.engine import SearchEngine, clean_query_text, match_probability
from albef.service.images import UploadPolicy, decode_upload, read_stored_image
from albef.service.metrics import Metrics
from albef.service.protocols import IndexView

__all__ = [
    "OVERLAY_MAX_SIDE",
    "Heatmaps",
    "ExplainQuery",
    "ExplainResult",
    "Explainer",
    "gradcam",
    "jet",
    "render_overlay",
    "png_base64",
]

OVERLAY_MAX_SIDE = 512  # the overlay keeps the image's aspect ratio; larger images are scaled down to this
_STORED_IMAGE_MAX_BYTES = 64 << 20  # an indexed image file read back for the overlay


class ExplainBundle(Protocol):
    """What explaining needs from the model bundle (``albef.model.runtime.Bundle`` has it)."""

    image_res: int
    has_explain: bool
    explain_info: dict[str, Any] | None
    tokenizer: Any

    def preprocess(self, images: Any, *, exif_transpose: bool = True) -> np.ndarray: ...
    def explain(self, text_tokens: Any, text_mask: Any, image_tokens: Any) -> dict[str, np.ndarray]: ...
    def token_strings(self, ids: Any) -> list[str]: ...


# -- Grad-CAM -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heatmaps:
    """Grad-CAM maps of one pair: ``overall`` ``[side, side]`` and ``per_token`` ``[T, side, side]`` for the
    text's T real tokens (row 0 is [CLS])."""

    overall: np.ndarray
    per_token: np.ndarray

    @property
    def side(self) -> int:
        return int(self.overall.shape[0])


def gradcam(attention: np.ndarray, attention_grad: np.ndarray, mask: np.ndarray) -> Heatmaps:
    """Grad-CAM from the explain graph's outputs for one pair: ``attention`` and ``attention_grad``
    ``[1, heads, L, N]`` (N = 1 image [CLS] + side² patches), ``mask`` ``[L]`` or ``[1, L]`` (1 = real token;
    the real tokens are a prefix, as the tokenizer pads on the right)."""
    a = np.asarray(attention, np.float64)[0]
    g = np.asarray(attention_grad, np.float64)[0]
    patches = a.shape[-1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} image patches are not a square grid")
    cam = (a[..., 1:] * np.maximum(g[..., 1:], 0.0)).mean(axis=0)  # [L, side²], averaged over heads
    real = np.asarray(mask).reshape(-1)[: cam.shape[0]].astype(bool)
    rows = cam[real].reshape(-1, side, side)
    if len(rows) == 0:
        raise ValueError("the text has no token")
    return Heatmaps(overall=rows.mean(axis=0), per_token=rows)


# -- the overlay ----------------------------------------------------------------------------------------------
# matplotlib's "jet": piecewise linear in each channel (x, value) pairs.
_JET = {
    "r": ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    "g": ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    "b": ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
}


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] (``[..., 3]``), the "jet" colour map (blue, cyan, yellow, red)."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, *_JET[c]) for c in "rgb"], axis=-1)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x - x.min()
    top = x.max()
    return x / top if top > 0 else x


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur (edges reflected), as ``scipy.ndimage.gaussian_filter`` with truncate 4."""
    if sigma <= 0:
        return x
    r = max(1, int(4 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="symmetric")
        x = np.apply_along_axis(lambda row: np.convolve(row, k, mode="valid"), axis, xp)
    return x


def render_overlay(grid: np.ndarray, image: Image.Image | None, *, size: int = 384) -> Image.Image:
    """The heat map ``grid`` over ``image`` (scaled down to :data:`OVERLAY_MAX_SIDE` if larger), or, without an
    image, the coloured map alone at ``size`` x ``size``."""
    if image is not None:
        base = image.convert("RGB")
        if max(base.size) > OVERLAY_MAX_SIDE:
            base.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BICUBIC)
        width, height = base.size
    else:
        base, width, height = None, size, size
    m = _normalised(np.asarray(grid, np.float64)).astype(np.float32)
    heat = np.asarray(
        Image.fromarray(m, mode="F").resize((width, height), Image.Resampling.BICUBIC), np.float64
    )
    heat = _normalised(_gaussian_blur(heat, 0.02 * max(width, height)))
    colour = jet(heat)
    if base is None:
        out = colour
    else:
        alpha = (heat**0.7)[..., None]
        out = (1.0 - alpha) * (np.asarray(base, np.float64) / 255.0) + alpha * colour
    return Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- the stored image of an indexed item (for its overlay) ---------------------------------------------------
def stored_image(reader: IndexView, item: dict[str, Any], policy: UploadPolicy) -> Image.Image | None:
    """The indexed image of ``item`` if it is a local file that still holds the indexed bytes (sha256), decoded
    with the upload policy (formats, pixel limit, EXIF orientation); None otherwise (a URI, a missing or
    changed file): the overlay is then the heat map alone."""
    path = reader.image_path(int(item["id"]))
    if path is None:
        return None
    try:
        data = read_stored_image(path, item.get("sha256"), max_bytes=_STORED_IMAGE_MAX_BYTES)
    except OSError:
        return None
    if data is None:
        return None
    try:
        return decode_upload(data, dataclasses.replace(policy, max_bytes=_STORED_IMAGE_MAX_BYTES))
    except SearchError:
        return None


# -- one request ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExplainQuery:
    """What to explain: ``text`` against exactly one of ``item_id`` (an indexed image) or ``image`` (bytes)."""

    text: str
    item_id: int | None = None
    image: bytes | None = None
    per_word: bool = False
    overlay: bool = True


@dataclass
class ExplainResult:
    heatmaps: Heatmaps
    tokens: list[str]  # the WordPieces after [CLS]; per_token[1:] are their maps
    logits: np.ndarray  # [2]
    probability: float
    overlay_png: str | None = None  # base64
    overlay_size: tuple[int, int] | None = None
    overlay_on: str | None = None  # "image" or "heatmap"
    query: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Explainer:
    """Runs explain requests with a search engine's bundle and stages; at most ``queue_max`` at a time (one
    more is refused with :class:`Overloaded`, a 503). With ``metrics``: the ``explain`` stage's latency
    (graph and Grad-CAM) and its rejections."""

    def __init__(self, queue_max: int = 64, retry_after_s: int = 1, metrics: Metrics | None = None) -> None:
        self.queue_max = int(queue_max)
        self.retry_after_s = int(retry_after_s)
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(self.queue_max)
        if metrics is not None:
            metrics.rejections.labels(stage="explain")  # a zero sample from the start, as the other stages

    async def explain(self, engine: SearchEngine, reader: IndexView, query: ExplainQuery) -> ExplainResult:
        if not self._slots.acquire(blocking=False):
            if self.metrics is not None:
                self.metrics.rejections.labels(stage="explain").inc()
            raise Overloaded("explain", self.retry_after_s)
        try:
            return await self._explain(engine, reader, query)
        finally:
            self._slots.release()

    async def _explain(self, engine: SearchEngine, reader: IndexView, query: ExplainQuery) -> ExplainResult:
        bundle: ExplainBundle = engine.bundle  # type: ignore[assignment]
        t0 = time.perf_counter()
        cleaned = clean_query_text(query.text)
        ids, mask = bundle.tokenizer([cleaned], clean=False)
        _, text_tokens = await engine.stages.encode_text(ids[0], mask[0])
        picture, image_tokens, echo = await self._image(engine, reader, query)
        t1 = time.perf_counter()

        def run() -> tuple[ExplainResult, float]:
            out = bundle.explain(text_tokens[None], mask, image_tokens[None])
            maps = gradcam(out["attention"], out["attention_grad"], mask[0])
            n = int(mask[0].sum())
            logits = out["itm_logits"][0]
            result = ExplainResult(
                heatmaps=maps,
                tokens=bundle.token_strings(ids[0][1:n]),
                logits=logits,
                probability=float(match_probability(logits)[0]),
                query={"kind": "explain", "text": query.text, **echo},
            )
            t_model = time.perf_counter()
            if query.overlay:
                img = render_overlay(maps.overall, picture, size=bundle.image_res)
                result.overlay_png = png_base64(img)
                result.overlay_size = img.size
                result.overlay_on = "image" if picture is not None else "heatmap"
            return result, t_model

        result, t2 = await asyncio.to_thread(run)
        t3 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.stage_latency.labels(stage="explain").observe(t2 - t1)
        result.timings_ms = {
            "encode": round((t1 - t0) * 1000.0, 3),
            "explain": round((t2 - t1) * 1000.0, 3),
            "render": round((t3 - t2) * 1000.0, 3),
            "total": round((t3 - t0) * 1000.0, 3),
        }
        return result

    async def _image(
        self, engine: SearchEngine, reader: IndexView, query: ExplainQuery
    ) -> tuple[Image.Image | None, np.ndarray, dict[str, Any]]:
        """(the picture for the overlay or None, the image tokens ``[N, W]``, what the query echoes)."""
        bundle: ExplainBundle = engine.bundle  # type: ignore[assignment]
        if query.item_id is not None:
            item_id = int(query.item_id)

            def lookup() -> tuple[Image.Image | None, np.ndarray]:
                item = reader.item(item_id)
                if item is None:
                    raise NotFound(
                        "item_not_found",
                        f"no item {item_id} in index version {reader.version}",
                        field="item_id",
                    )
                if item["kind"] != "image":
                    raise BadQuery(
                        "wrong_item_kind",
                        f"item {item_id} is a {item['kind']}; explain needs an indexed image",
                        field="item_id",
                    )
                tokens = reader.image_tokens([item_id])[0]  # what the re-ranking scored
                picture = stored_image(reader, item, engine.uploads) if query.overlay else None
                return picture, tokens

            picture, tokens = await asyncio.to_thread(lookup)
            return picture, tokens, {"item_id": item_id}
        assert query.image is not None
        data = query.image

        def prepare() -> tuple[Image.Image, np.ndarray]:
            img = decode_upload(data, engine.uploads)  # upright already, if the policy says so
            return img, bundle.preprocess([img], exif_transpose=False)[0]

        picture, pixels = await asyncio.to_thread(prepare)
        _, tokens = await engine.stages.encode_image(pixels)
        return picture, tokens, {"bytes": len(data)}
