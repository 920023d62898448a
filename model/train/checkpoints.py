"""Training checkpoints: what ``--resume`` needs to continue exactly where a run stopped.

OUT/checkpoints/step-000200/model/        our format (save_albef, float32)
OUT/checkpoints/step-000200/state.pt      optimizer, scheduler, momentum weights, queues, step,
                                          every rank's RNG states (the data position is the step)
OUT/checkpoints/latest                    name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from albef import atomic
from albef.model.checkpoint import load_strict, read_albef, save_albef
from albef.model.train.distributed import barrier
from albef.model.train.momentum import world_size

log = logging.getLogger("albef.model.train.trainer")  # one logger for the whole training run

STATE_FILE = "state.pt"
LATEST = "latest"

__all__ = [
    "LATEST",
    "STATE_FILE",
    "config_diff",
    "load_training_state",
    "save_training_state",
    "truncate_metrics",
]


def save_training_state(tr: Any) -> None:
    """Write ``OUT/checkpoints/step-N`` (model + state.pt) atomically, point ``latest`` at it, prune old ones."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and tr.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(tr.device)
    rngs: list[Any] = [rng]
    if world_size() > 1:
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, rng)
    if tr.rank == 0:
        root = tr._ckpt_root()
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{tr.step:06d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_albef(tr.model, tmp / "model", source={"training_step": tr.step})
        state = {
            "step": tr.step,
            "world_size": world_size(),
            "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(),
            **tr.objective.extra_state(),
            "rng": rngs,
            "config": tr.cfg,
            "bad_items": tr.bad_items,
        }
        torch.save(state, tmp / STATE_FILE)
        final = root / name
        atomic.publish_dir(tmp, final, replace_existing=True)
        atomic.write_text(root / LATEST, name + "\n")
        keep = int(tr.cfg["checkpoint"]["keep"])
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written", extra={"path": str(final), "step": tr.step})
    barrier()


def load_training_state(tr: Any) -> bool:
    """Restore the newest checkpoint into the trainer; False when there is none."""
    root = tr._ckpt_root()
    if not (root / LATEST).is_file():
        log.info("no checkpoint to resume from; starting a new run", extra={"out": str(tr.out)})
        return False
    path = root / (root / LATEST).read_text().strip()
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state["world_size"] != world_size():
        raise ValueError(
            f"{path} was written by {state['world_size']} process(es); resume with the same number "
            f"(now {world_size()}) to continue the same data order"
        )
    changed = config_diff(state["config"], tr.cfg)
    if changed:
        log.warning("resuming with a changed config", extra={"changed": changed})
    _, weights = read_albef(path / "model")
    if not tr.model.with_mlm:
        weights = {k: v for k, v in weights.items() if not k.startswith("text_encoder.cls.")}
    load_strict(tr.model, weights)
    tr.objective.load_extra_state(state)
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    tr.step = int(state["step"])
    tr.bad_items = int(state.get("bad_items", 0))
    rng = state["rng"][tr.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and tr.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], tr.device)
    log.info("resumed", extra={"path": str(path), "step": tr.step})
    return True


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    atomic.write_text(path, "".join(ln + "\n" for ln in keep))


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []
