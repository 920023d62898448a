"""What a training run leaves behind: the final weights and reports, and the logged loss means."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from albef import atomic
from albef.model.checkpoint import save_albef

log = logging.getLogger("albef.model.train.trainer")  # one logger for the whole training run

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["DTYPES", "LossMeter", "evaluate_checkpoint", "write_final"]


def write_final(tr: Any, summary: dict[str, Any]) -> None:
    """The final weights (``final.dtype``), tokenizer, training.json and, with ``eval.split``, eval.json."""
    dtype = DTYPES[tr.cfg["final"]["dtype"]]
    final = tr.final_dir
    save_albef(tr.model, final, source={"recipe": tr.cfg, "training": summary}, dtype=dtype)
    tr.tokenizer.save(final / "tokenizer.json.tmp")
    (final / "tokenizer.json.tmp").replace(final / "tokenizer.json")
    atomic.write_text(final / "training.json", json.dumps({"config": tr.cfg, "summary": summary}, indent=2))
    atomic.write_text(tr.out / "summary.json", json.dumps(summary, indent=2))
    log.info("final weights written", extra={"path": str(final), **summary})
    split = tr.cfg["eval"]["split"]
    data_file = tr.cfg["data"].get(split) if split else None
    if data_file:
        report = evaluate_checkpoint(
            final,
            data_file,
            tr.cfg["data"]["image_root"],
            int(tr.cfg["eval"]["k_test"]),
            int(tr.cfg["eval"]["batch_size"]),
        )
        report["training"] = summary
        text = json.dumps(report, indent=2)
        atomic.write_text(final / "eval.json", text)
        atomic.write_text(tr.out / "eval.json", text)
        summary["eval"] = {"itc": report["itc"], "itm": report["itm"]}


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_file: str | Path,
    image_root: str | Path | None,
    k_test: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The official evaluation (helper module ``evaluate``) of a saved checkpoint, loaded as shipped."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.truth import load_truth
    from albef.model.factory import create_model
    from albef.model.text import AlbefTokenizer, default_vocab_path
    from albef.model.train.evaluate import evaluate

    model = create_model(None, checkpoint)
    tok = AlbefTokenizer.from_vocab(default_vocab_path())
    eval_set = load_eval_set(data_file, image_root)
    with torch.no_grad():
        truth = load_truth(
            data_file, eval_set.images, eval_set.texts
        )  # synthetic data: caption-truth metrics
        report = evaluate(
            model, eval_set, tok, k_test=k_test, batch_size=batch_size, progress=False, truth=truth
        )
    report["checkpoint"] = str(checkpoint)
    report["data"] = str(data_file)
    return report


class LossMeter:
    """Running means of the losses over a logging interval (all-reduced across ranks)."""

    KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc", "loss_itm_pairs")

    def __init__(self) -> None:
        self.sums = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64)
        self.n = 0

    def add(self, out: dict[str, Any], alpha: float) -> None:
        vals = [float(out[k].detach()) for k in self.KEYS] + [alpha]
        self.sums += torch.tensor(vals, dtype=torch.float64)
        self.n += 1

    def summary(self, world: int) -> dict[str, float]:
        sums = torch.cat([self.sums, torch.tensor([float(self.n)], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(sums)
        n = max(float(sums[-1]), 1.0)
        rec = {k: round(float(v) / n, 5) for k, v in zip(self.KEYS, sums[: len(self.KEYS)], strict=True)}
        rec["alpha"] = round(float(sums[len(self.KEYS)]) / n, 5)
        return rec
