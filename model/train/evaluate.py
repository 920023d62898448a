"""The official retrieval evaluation (docs/model.md §4.3 and 4.4): ITC shortlist, ITM re-ranking, recall at 1/5/10.

``score_matrices`` follows ``Retrieval.py:evaluation`` in one process: plain cosine ``sims`` (no temperature),
then for every image its top ``k_test`` texts by ITC and for every text its top ``k_test`` images are scored
with the fusion encoder; the final score is the **raw class-1 ITM logit alone** (ITC not added, no softmax)
and every entry outside the shortlist stays -100. ``itm_eval`` ranks each row and reports recall.

Ordering and ties: both the ITC shortlist and the final ranking follow :func:`albef.model.ranking.rank`, the
rule the service uses too: descending score, equal scores in ascending column order (lower text/image id
first). The official code's ``np.argsort(score)[::-1]`` would put the higher id first on a tie; only exact
ties differ, e.g. the -100 fill, which can only matter for R@5/R@10 when ``k_test < 10``.

Exact speed-ups, same numbers up to float rounding: a pair short-listed in both directions is scored once;
the cross-attention keys/values of an image are computed once (``model.image_kv``) instead of once per pair
(cached for all images when they fit in ``kv_cache_bytes``, else computed per image with its pairs grouped);
the last fusion layer runs its query side for the [CLS] row only, the one the ITM head reads
(:func:`itm_cls_logits`). The tests compare every short-listed entry with a plain ``model.itm_logits`` call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from albef.model.ranking import RANKING, rank
from albef.model.train.recall import default_ks, format_table, itm_eval, plot_r1_vs_k  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

TEXT_CHUNK = 256  # texts per forward in the feature pass, as the official evaluation
FILL = -100.0  # score of pairs outside the ITC shortlist


@dataclass
class ScoreMatrices:
    sims: np.ndarray  # [n_images, n_texts] ITC cosine (no temp)
    i2t: np.ndarray  # [n_images, n_texts] ITM logit (class 1) on the top-k_test texts, -100 elsewhere
    t2i: np.ndarray  # [n_texts, n_images] likewise
    k_test: int


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DistributedDataParallel


class _EvalMode:
    """Eval mode, no grad and autocast off (float32) for the block; the caller's train/eval mode is restored
    afterwards, so the trainer can evaluate mid-run."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.stack.enter_context(torch.no_grad())
        for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            self.stack.enter_context(torch.autocast(device_type, enabled=False))

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        self.model.train(self.was_training)


def compute_features(
    model: Any,
    images: Sequence[Path],
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    exif_transpose: bool = True,
) -> dict[str, Tensor]:
    """ITC embeddings and unimodal tokens of every image and text (docs/model.md §4.3 steps 1-2), float32 tensors.
    ``exif_transpose=False`` loads images as the official code does (EXIF orientation ignored).

    Returns ``image_emb [N, D]``, ``image_tokens [N, T, W]``, ``text_emb [M, D]``, ``text_tokens [M, L, H]``,
    ``text_mask [M, L]`` on ``device``.
    """
    from albef.model.image import preprocess
    from albef.progress import progress_bar

    model = _unwrap(model)
    cfg = model.config
    device = torch.device(device)
    out: dict[str, list[Tensor]] = {
        k: [] for k in ("text_emb", "text_tokens", "text_mask", "image_emb", "image_tokens")
    }
    with _EvalMode(model):
        for start in progress_bar(range(0, len(texts), TEXT_CHUNK), desc="text features", enabled=progress):
            ids, mask = tokenizer(list(texts[start : start + TEXT_CHUNK]))
            ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            emb, tokens = model.encode_text(ids_t, mask_t)
            out["text_emb"].append(emb.float())
            out["text_tokens"].append(tokens.float())
            out["text_mask"].append(mask_t)

        def load(start: int) -> np.ndarray:
            return preprocess(
                images[start : start + batch_size],
                cfg.vision.image_res,
                cfg.mean,
                cfg.std,
                exif_transpose=exif_transpose,
            )

        starts = list(range(0, len(images), batch_size))
        # Decode/resize the next batch (PIL releases the GIL) while the model runs on this one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, starts[0]) if starts else None
            for n, _ in enumerate(progress_bar(starts, desc="image features", enabled=progress)):
                assert pending is not None
                pixels = pending.result()
                pending = pool.submit(load, starts[n + 1]) if n + 1 < len(starts) else None
                emb, tokens = model.encode_image(torch.from_numpy(pixels).to(device))
                out["image_emb"].append(emb.float())
                out["image_tokens"].append(tokens.float())
    feats = {}
    for k, parts in out.items():
        if parts:
            feats[k] = torch.cat(parts)
        else:  # an empty side: keep the feature shapes
            feats[k] = torch.empty(0)
    return feats


def _kv_cache(
    model: Any, image_tokens: Tensor, batch_size: int, budget: int
) -> list[tuple[Tensor, Tensor]] | None:
    """Cross-attention K/V of every image for every fusion layer, if they fit in ``budget`` bytes."""
    n, t, _ = image_tokens.shape
    tc = model.config.text
    layers = tc.num_hidden_layers - tc.fusion_layer
    need = 2 * layers * n * t * tc.hidden_size * image_tokens.element_size()
    if need > budget:
        log.info("image K/V cache too large, computing per pair", extra={"bytes": need, "budget": budget})
        return None
    parts: list[list[tuple[Tensor, Tensor]]] = []
    for start in range(0, n, batch_size):
        parts.append(model.image_kv(image_tokens[start : start + batch_size]))
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(layers)]


def itm_cls_logits(
    model: Any, text_tokens: Tensor, text_mask: Tensor, image_kv: list[tuple[Tensor, Tensor]]
) -> Tensor:
    """``model.itm_logits_kv`` computing only what the ITM head reads: in the last fusion layer only the [CLS]
    row is a query (the other rows' outputs are never used), all rows still serve as keys/values. Same
    numbers up to float rounding; about half the work for albef-tiny (2 fusion layers)."""
    from albef.model.bert import extended_attention_mask

    layers = model.text_encoder.fusion_layers
    if not layers:
        raise ValueError("the model has no fusion layers (fusion_layer == num_hidden_layers)")
    ext = extended_attention_mask(text_mask, text_tokens.dtype)
    hidden = text_tokens
    for layer, kv in zip(layers[:-1], image_kv[:-1], strict=True):
        hidden = layer(hidden, ext, None, kv)
    last = layers[-1]
    sa = last.attention.self
    cls = hidden[:, :1]
    x = last.attention.output(sa(cls, ext, None, sa.key_value(hidden)), cls)
    x = last.crossattention(x, None, None, image_kv[-1])
    x = last.output(last.intermediate(x), x)
    return model.itm_head(x[:, 0])


def _pair_scores(
    model: Any,
    feats: dict[str, Tensor],
    text_idx: np.ndarray,
    image_idx: np.ndarray,
    cache: list[tuple[Tensor, Tensor]] | None,
    batch_size: int,
    bar: Any,
) -> np.ndarray:
    """ITM class-1 logits of the pairs (text_idx[p], image_idx[p]).

    With the K/V cache: batches of ``batch_size`` pairs, each pair gathering its image's K/V. Without it the
    pairs are grouped by image: one image's K/V computed once and broadcast over its texts.
    """
    out = np.empty(len(text_idx), dtype=np.float32)
    device = feats["text_tokens"].device

    def run(sel: np.ndarray, kv: list[tuple[Tensor, Tensor]] | None) -> None:
        t = torch.from_numpy(text_idx[sel]).to(device)
        if kv is None:
            assert cache is not None
            i = torch.from_numpy(image_idx[sel]).to(device)
            kv = [(k[i], v[i]) for k, v in cache]
        logits = itm_cls_logits(model, feats["text_tokens"][t], feats["text_mask"][t], kv)
        out[sel] = logits[:, 1].float().cpu().numpy()
        bar.update(len(sel))

    if cache is not None:
        for start in range(0, len(text_idx), batch_size):
            run(np.arange(start, min(start + batch_size, len(text_idx))), None)
        return out
    order = np.argsort(image_idx, kind="stable")
    bounds = np.flatnonzero(np.diff(image_idx[order])) + 1
    for group in np.split(order, bounds):
        if not len(group):
            continue
        kv = model.image_kv(feats["image_tokens"][int(image_idx[group[0]]) : int(image_idx[group[0]]) + 1])
        for start in range(0, len(group), batch_size):
            run(group[start : start + batch_size], kv)
    return out


def score_matrices(
    model: Any,
    feats: dict[str, Tensor],
    k_test: int,
    batch_size: int = 64,
    progress: bool = True,
    kv_cache_bytes: int = 2 << 30,
) -> ScoreMatrices:
    """docs/model.md §4.3, steps 3-6: ITC sims, then ITM logits on each query's top ``k_test`` ITC candidates.

    A pair short-listed in both directions (image i has text t in its top k and t has i in its top k) is
    scored once and written to both matrices: the logit of a pair does not depend on the direction.
    """
    from albef.progress import progress_bar

    if k_test < 1:
        raise ValueError("k_test must be >= 1")
    model = _unwrap(model)
    image_emb, text_emb = feats["image_emb"], feats["text_emb"]
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"nothing to evaluate: {n_img} images, {n_txt} texts")
    with _EvalMode(model):
        sims = (image_emb @ text_emb.T).float().cpu().numpy()
        k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
        cand_i2t = rank(sims, k=k_i2t)  # [n_img, k] text ids
        cand_t2i = rank(sims.T, k=k_t2i)  # [n_txt, k] image ids
        # Pair id = text * n_img + image, for both directions; score each distinct pair once.
        pid_i2t = cand_i2t * n_img + np.arange(n_img)[:, None]
        pid_t2i = np.arange(n_txt)[:, None] * n_img + cand_t2i
        unique, inverse = np.unique(np.concatenate([pid_i2t.ravel(), pid_t2i.ravel()]), return_inverse=True)
        cache = _kv_cache(model, feats["image_tokens"], batch_size, kv_cache_bytes)
        with progress_bar(total=len(unique), desc="ITM re-rank", unit="pair", enabled=progress) as bar:
            scores = _pair_scores(model, feats, unique // n_img, unique % n_img, cache, batch_size, bar)
        per_entry = scores[inverse]
        i2t = np.full((n_img, n_txt), FILL, dtype=np.float32)
        np.put_along_axis(i2t, cand_i2t, per_entry[: pid_i2t.size].reshape(n_img, k_i2t), axis=1)
        t2i = np.full((n_txt, n_img), FILL, dtype=np.float32)
        np.put_along_axis(t2i, cand_t2i, per_entry[pid_i2t.size :].reshape(n_txt, k_t2i), axis=1)
    log.info(
        "ITM re-ranking",
        extra={
            "k_test": k_test,
            "pairs": int(pid_i2t.size + pid_t2i.size),
            "distinct_pairs": int(len(unique)),
        },
    )
    return ScoreMatrices(sims=sims, i2t=i2t, t2i=t2i, k_test=k_test)


def restrict_k(scores: ScoreMatrices, k: int) -> ScoreMatrices:
    """The matrices a run with a smaller ``k`` would give: each query keeps its ITM logits only on its top-k
    ITC candidates. Exact, because the shortlist is a stable sort of the same ``sims`` (so top-k is a prefix
    of top-K) and a pair's ITM logit does not depend on the other candidates."""
    if k > scores.k_test:
        raise ValueError(f"cannot derive k={k} from a run with k_test={scores.k_test}")

    def cut(full: np.ndarray, sims: np.ndarray) -> np.ndarray:
        cand = rank(sims, k=min(k, sims.shape[1]))
        out = np.full_like(full, FILL)
        np.put_along_axis(out, cand, np.take_along_axis(full, cand, axis=1), axis=1)
        return out

    return ScoreMatrices(scores.sims, cut(scores.i2t, scores.sims), cut(scores.t2i, scores.sims.T), k)


def evaluate(
    model: Any,
    eval_set: Any,
    tokenizer: Any,
    k_test: int,
    ks_for_plot: Sequence[int] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    exif_transpose: bool = True,
    truth: Any = None,
) -> dict[str, Any]:
    """Features, score matrices, recall tables (ITC only and ITC+ITM) and the R@1-vs-K curve; with ``truth``
    (:func:`albef.model.data.truth.load_truth`, synthetic data) also the caption-truth metrics.

    The ITM logits are computed once, for the largest K needed; every smaller K (``k_test`` included) is
    derived with :func:`restrict_k`, which gives exactly what a separate run with that K would give.
    """
    if not eval_set.images or not eval_set.texts:
        raise ValueError("the eval set has no images or no texts")
    ks = sorted(set(ks_for_plot if ks_for_plot is not None else default_ks(k_test)) | {k_test})
    if ks[0] < 1:
        raise ValueError("every K must be >= 1")
    t0 = time.perf_counter()
    feats = compute_features(
        model,
        eval_set.images,
        eval_set.texts,
        tokenizer,
        batch_size,
        device,
        progress,
        exif_transpose=exif_transpose,
    )
    t1 = time.perf_counter()
    full = score_matrices(model, feats, ks[-1], batch_size, progress)
    t2 = time.perf_counter()
    args = (eval_set.txt2img, eval_set.img2txt)
    itc = itm_eval(full.sims, full.sims.T, *args)
    curve: dict[str, list[float]] = {"k": [], "txt_r1": [], "img_r1": [], "r_mean": []}
    itm = None
    for k in ks:
        res = itm_eval(*_pair(restrict_k(full, k)), *args)
        curve["k"].append(k)
        curve["txt_r1"].append(res["txt_r1"])
        curve["img_r1"].append(res["img_r1"])
        curve["r_mean"].append(res["r_mean"])
        if k == k_test:
            itm = res
    n_img, n_txt = len(eval_set.images), len(eval_set.texts)
    report = {
        "itm": itm,
        "itc": itc,
        "k_test": k_test,
        "r1_vs_k": curve | {"itc_txt_r1": itc["txt_r1"], "itc_img_r1": itc["img_r1"]},
        "n_images": n_img,
        "n_texts": n_txt,
        "pairs_shortlisted": n_img * min(ks[-1], n_txt) + n_txt * min(ks[-1], n_img),
        "ranking": RANKING,
        "timings": {
            "features_s": round(t1 - t0, 3),
            "itm_s": round(t2 - t1, 3),
            "metrics_s": round(time.perf_counter() - t2, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        },
    }
    if truth is not None:
        report["truth"] = truth_report(
            model, feats, restrict_k(full, k_test), truth, eval_set.txt2img, batch_size
        )
    log.info("evaluation done", extra={"k_test": k_test, "r_mean": itm["r_mean"] if itm else None})
    return report


class _NoBar:
    def update(self, n: int) -> None:
        pass


def truth_report(
    model: Any,
    feats: dict[str, Tensor],
    scores: ScoreMatrices,
    truth: Any,
    txt2img: Sequence[int],
    batch_size: int = 64,
) -> dict[str, Any]:
    """Caption-truth P@1/P@5 of ITC alone and of ITC+ITM (``scores`` at k_test), and the swap suite: ITC
    cosine against the ITM match logit at picking the one group member a caption is true of
    (:mod:`albef.model.data.truth`)."""
    from albef.model.data.truth import swap_cases, swap_suite, truth_precision

    cases = swap_cases(truth, txt2img)
    t_idx = np.array([t for t, members, _ in cases for _ in members], dtype=np.int64)
    i_idx = np.array([m for _, members, _ in cases for m in members], dtype=np.int64)
    model = _unwrap(model)
    logits = np.empty(0, dtype=np.float32)
    if len(t_idx):
        with _EvalMode(model):
            cache = _kv_cache(model, feats["image_tokens"], batch_size, 2 << 30)
            logits = _pair_scores(model, feats, t_idx, i_idx, cache, batch_size, _NoBar())
    itm_of = {(int(t), int(i)): float(v) for t, i, v in zip(t_idx, i_idx, logits, strict=True)}
    suite = swap_suite(
        cases,
        {
            "itc": lambda t, members: scores.sims[members, t],
            "itm": lambda t, members: np.array([itm_of[(t, m)] for m in members]),
        },
    )
    return {
        "itc": truth_precision(scores.sims.T, scores.sims, truth),
        "itm": truth_precision(scores.t2i, scores.i2t, truth),
        "swap": suite,
        "metric": "caption-truth precision@K (%): share of the top K the caption is true of, by the "
        "generator's scene semantics; swap: accuracy (%) at picking the one group member a "
        "caption is true of (false of the others)",
    }


def _pair(s: ScoreMatrices) -> tuple[np.ndarray, np.ndarray]:
    return s.i2t, s.t2i
