"""Recall at K from score matrices, and the evaluation report as a table and a plot (docs/model.md §4.4).

Ranking follows :func:`albef.model.ranking.rank` (descending score, ties to the lower column), the rule the
service uses too. ``itm_eval`` gives the official figures: for image->text the best position of any of the
image's captions, for text->image the position of the annotated image; R@1/5/10 in percent and their means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from albef.model.ranking import rank

__all__ = ["default_ks", "format_table", "itm_eval", "plot_r1_vs_k"]


def _ranks(scores: np.ndarray, gts: Sequence[Sequence[int]], chunk: int = 1024) -> np.ndarray:
    """Per row, the best position of any ground-truth column in the row's ranking (1e20 if none)."""
    ranks = np.full(scores.shape[0], 1e20)
    for start in range(0, scores.shape[0], chunk):
        order = rank(np.asarray(scores[start : start + chunk]))
        pos = np.empty_like(order)
        np.put_along_axis(pos, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
        for r in range(order.shape[0]):
            gt = gts[start + r]
            if len(gt):
                ranks[start + r] = pos[r, list(gt)].min()
    return ranks


def itm_eval(
    scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]]
) -> dict[str, float]:
    """docs/model.md §4.4: recall at 1/5/10 both ways (percent), their means and ``r_mean``."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    if scores_i2t.shape != (len(img2txt), len(txt2img)) or scores_t2i.shape != (len(txt2img), len(img2txt)):
        raise ValueError(
            f"score shapes {scores_i2t.shape} / {scores_t2i.shape} do not match "
            f"{len(img2txt)} images x {len(txt2img)} texts"
        )
    ranks_i = _ranks(scores_i2t, img2txt)
    ranks_t = _ranks(scores_t2i, [[g] for g in txt2img])

    def recall(ranks: np.ndarray, k: int) -> float:
        return float(100.0 * np.mean(ranks < k))

    tr = [recall(ranks_i, k) for k in (1, 5, 10)]
    ir = [recall(ranks_t, k) for k in (1, 5, 10)]
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": sum(tr) / 3}
    out |= {"img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": sum(ir) / 3}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def default_ks(k_test: int) -> list[int]:
    ks = [2**p for p in range(int(math.log2(k_test)) + 1)] if k_test >= 1 else []
    return sorted(set(ks) | {k_test})


def format_table(report: dict[str, Any]) -> str:
    """The two recall tables (ITC only, ITC+ITM) as aligned text."""
    cols = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    lines = [f"{'':<22}" + "".join(f"{c:>9}" for c in cols)]
    rows = (("ITC only", report["itc"]), (f"ITC+ITM (k={report['k_test']})", report["itm"]))
    for name, res in rows:
        lines.append(f"{name:<22}" + "".join(f"{res[c]:>9.2f}" for c in cols))
    if "truth" in report:
        t = report["truth"]
        lines.append(
            f"{'caption truth (%)':<22}{'t2i_p1':>9}{'t2i_p5':>9}{'i2t_p1':>9}{'i2t_p5':>9}{'swap':>9}"
        )
        for name in ("itc", "itm"):
            p = t[name]
            swap = t["swap"][name]
            lines.append(
                f"{name.upper():<22}"
                + "".join(f"{p[c]:>9.2f}" for c in ("t2i_p1", "t2i_p5", "i2t_p1", "i2t_p5"))
                + (f"{swap:>9.2f}" if swap is not None else f"{'-':>9}")
            )
        lines.append(f"swap suite: {t['swap']['cases']} captions, chance {t['swap']['chance']}")
    return "\n".join(lines)


def plot_r1_vs_k(report: dict[str, Any], path: str | Path) -> None:
    """PNG of R@1 (both directions) against K, ITC-only R@1 as dashed lines. Written atomically."""
    import os

    import matplotlib

    from albef import atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["r1_vs_k"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(curve["k"], curve["txt_r1"], "o-", color="tab:blue", label="image->text R@1 (ITC+ITM)")
    ax.plot(curve["k"], curve["img_r1"], "s-", color="tab:orange", label="text->image R@1 (ITC+ITM)")
    ax.axhline(curve["itc_txt_r1"], ls="--", color="tab:blue", alpha=0.6, label="image->text R@1 (ITC only)")
    ax.axhline(
        curve["itc_img_r1"], ls="--", color="tab:orange", alpha=0.6, label="text->image R@1 (ITC only)"
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["k"], [str(k) for k in curve["k"]])
    ax.minorticks_off()
    ax.set_xlabel("K (ITC candidates re-ranked by ITM)")
    ax.set_ylabel("R@1 (%)")
    ax.set_title(f"R@1 vs K ({report['n_images']} images, {report['n_texts']} texts)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if "truth" in report:  # the caption-truth metrics beside the official ones
        t = report["truth"]
        lines = [
            f"caption-truth P@1 t->i ITC {t['itc']['t2i_p1']:.1f} / ITM {t['itm']['t2i_p1']:.1f}",
            f"caption-truth P@1 i->t ITC {t['itc']['i2t_p1']:.1f} / ITM {t['itm']['i2t_p1']:.1f}",
        ]
        if t["swap"]["cases"]:
            lines.append(
                f"swap suite ({t['swap']['cases']}): ITC {t['swap']['itc']:.1f} / ITM "
                f"{t['swap']['itm']:.1f} (chance {t['swap']['chance']:.1f})"
            )
        ax.text(
            0.02,
            0.98,
            "\n".join(lines),
            transform=ax.transAxes,
            va="top",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        atomic.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
