"""The training loop behind ``albef train``: one code path for a single CPU process and ``torchrun`` DDP.

Per optimizer step: ``grad_accum`` micro-batches (DDP gradient sync only on the last), each running
:class:`~albef.model.train.objective.AlbefObjective` (EMA update, momentum features, ITC, enqueue, ITM, MLM)
under optional bf16 autocast; then AdamW and the step-based cosine schedule. Every ``checkpoint.every``
steps a checkpoint folder is written atomically (temp name, then rename):

    OUT/checkpoints/step-000200/model/        our format (save_albef, float32)
    OUT/checkpoints/step-000200/state.pt      optimizer, scheduler, momentum weights, queues, step,
                                              every rank's RNG states (the data position is the step)
    OUT/checkpoints/latest                    name of the newest complete checkpoint

``--resume`` reloads all of it. The data order is a function of (seed, epoch) and augmentation is seeded
per sample, so a resumed run takes exactly the batches and random draws of an uninterrupted one.
Metrics go to ``OUT/metrics.jsonl`` (rank 0), progress to a tqdm bar (loss, lr, samples/s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from albef.model.train.momentum import check_queue_size, rank, world_size
from torch import nn

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LATEST = "latest"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def setup_distributed(device: str) -> torch.device:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def init_weights(model: nn.Module) -> None:
    """BERT-style initialisation (HF ``_init_weights``) of the text side and the heads for training from
    scratch: normal(0, 0.02) for Linear and Embedding, zero biases and padding row, LayerNorm 1/0.
    timm initialises the ViT itself (truncated normal 0.02)."""
    for part in (model.text_encoder, model.vision_proj, model.text_proj, model.itm_head):
        for m in part.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def alpha_at(cfg_train: dict[str, Any], epoch: int, micro: int, micro_per_epoch: int) -> float:
    """The official ramp: ``alpha * min(1, i / len(loader))`` in epoch 0, ``alpha`` afterwards."""
    alpha = float(cfg_train["alpha"])
    if cfg_train["alpha_warmup"] and epoch == 0:
        return alpha * min(1.0, micro / micro_per_epoch)
    return alpha


def _atomic_write_text(path: Path, text: str) -> None:
    from albef import atomic

    atomic.write_text(path, text)


class Trainer:
    def __init__(
        self,
        cfg: dict[str, Any],
        out_dir: str | Path,
        resume: bool = False,
        final_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.final_dir = Path(final_dir) if final_dir else self.out / "final"
        self.progress = progress

    # ------------------------------------------------------------------------------------------ setup

    def _prepare_data(self) -> None:
        from albef.model.data.annotations import assign_idx, load_pairs
        from albef.model.train.dataset import AugmentConfig, PairDataset, TrainTransform, scan_images

        d = self.cfg["data"]
        if d["synth"]:
            s = dict(d["synth"])
            root = Path(s.pop("root", None) or self.out / "data")
            if self.rank == 0 and not (root / "dataset.json").is_file():
                from albef.model.data.synth import generate

                generate(root, int(s.get("images", 1000)), int(s.get("seed", 0)), int(s.get("size", 128)),
                         overwrite=True, progress=self.progress)
            barrier()
            d = {**d, "train": d["train"] or [str(root / "train.json")],
                 "val": d["val"] or str(root / "val.json"), "test": d["test"] or str(root / "test.json")}
            self.cfg = {**self.cfg, "data": d}
        items, problems = load_pairs(d["train"], d["image_root"])
        for p in problems:
            log.warning("skipping bad annotation row", extra=p)
        exif = not d["official_loader"]
        good, bad_images, cache = scan_images(items, decode=bool(d["cache_images"]), exif_transpose=exif)
        self.problems = problems + bad_images
        items = [items[i] for i in good]
        if not items:
            raise ValueError("no usable training pairs (see the warnings above)")
        self.items = items
        idx = assign_idx(items)
        mc = self.model.config
        aug = AugmentConfig.from_dict(self.cfg["augment"])
        transform = TrainTransform(mc.vision.image_res, mc.mean, mc.std, aug)
        self.dataset = PairDataset(items, idx, transform, seed=int(self.cfg["seed"]), cache=cache,
                                   exif_transpose=exif)
        log.info("training data", extra={"pairs": len(items), "images": len(set(idx)), "skipped": len(self.problems)})

    def _build_model(self) -> None:
        from albef.model.factory import create_model

        m = self.cfg["model"]
        t = self.cfg["train"]
        torch.manual_seed(int(self.cfg["seed"]))  # identical initial weights (and queues) on every rank
        model = create_model(m["config"], m["init"], m["image_res"], with_mlm=bool(t["mlm"]))
        if m["init"] is None and m["random_init"] == "bert":
            init_weights(model)
        if m["temp"] is not None:
            with torch.no_grad():
                model.temp.fill_(float(m["temp"]))
        from albef.model.train.objective import AlbefObjective

        self.model = model
        self.objective = AlbefObjective(
            model, self.cfg["mode"], t["queue_size"], t["momentum"], t["distill"], t["itm"], t["mlm"],
            t["mlm_probability"], t["clamp_temp"], t["itm_in_warmup"],
        ).to(self.device)
        self.objective.train()

    def _build_tokenizer(self) -> None:
        from albef.model.text import AlbefTokenizer, default_vocab_path

        self.tokenizer = AlbefTokenizer.from_vocab(default_vocab_path(), max_tokens=int(self.cfg["data"]["max_tokens"]))

    # ------------------------------------------------------------------------------------------ checkpoints

    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self) -> None:
        from albef.model.checkpoint import save_albef

        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs: list[Any] = [rng]
        if world_size() > 1:
            rngs = [None] * world_size()
            dist.all_gather_object(rngs, rng)
        if self.rank == 0:
            root = self._ckpt_root()
            root.mkdir(parents=True, exist_ok=True)
            name = f"step-{self.step:06d}"
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_albef(self.model, tmp / "model", source={"training_step": self.step})
            state = {
                "step": self.step,
                "world_size": world_size(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "momentum": self.objective.momentum_encoders.state_dict(),
                "queues": self.objective.queues.state_dict(),
                "rng": rngs,
                "config": self.cfg,
                "bad_items": self.bad_items,
            }
            torch.save(state, tmp / STATE_FILE)
            from albef import atomic

            final = root / name
            atomic.publish_dir(tmp, final, replace_existing=True)
            _atomic_write_text(root / LATEST, name + "\n")
            keep = int(self.cfg["checkpoint"]["keep"])
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint written", extra={"path": str(final), "step": self.step})
        barrier()

    def _load_checkpoint(self) -> bool:
        from albef.model.checkpoint import load_strict, read_albef

        root = self._ckpt_root()
        if not (root / LATEST).is_file():
            log.info("no checkpoint to resume from; starting a new run", extra={"out": str(self.out)})
            return False
        path = root / (root / LATEST).read_text().strip()
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state["world_size"] != world_size():
            raise ValueError(
                f"{path} was written by {state['world_size']} process(es); resume with the same number "
                f"(now {world_size()}) to continue the same data order"
            )
        changed = _diff(state["config"], self.cfg)
        if changed:
            log.warning("resuming with a changed config", extra={"changed": changed})
        _, weights = read_albef(path / "model")
        if not self.model.with_mlm:
            weights = {k: v for k, v in weights.items() if not k.startswith("text_encoder.cls.")}
        load_strict(self.model, weights)
        self.objective.momentum_encoders.load_state_dict(state["momentum"])
        self.objective.queues.load_state_dict(state["queues"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.bad_items = int(state.get("bad_items", 0))
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        log.info("resumed", extra={"path": str(path), "step": self.step})
        return True

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        from albef.model.precision import require_native
        from albef.model.train.dataset import ShardedBatches, collate
        from albef.model.train.optim import CosineWarmup, create_optimizer

        t = self.cfg["train"]
        if t["threads"]:
            torch.set_num_threads(int(t["threads"]))
        self.device = setup_distributed(str(t["device"]))
        if t["bf16"] and self.device.type == "cpu":
            # bf16 autocast on a CPU without bf16 instructions runs about 100x slower than fp32: refuse it.
            require_native("bfloat16", "train.bf16=true")
        self.rank, self.world = rank(), world_size()
        B, accum = int(t["batch_size"]), int(t["grad_accum"])
        check_queue_size(int(t["queue_size"]), B * self.world)
        self.out.mkdir(parents=True, exist_ok=True)
        self._build_model()
        self._build_tokenizer()
        self._prepare_data()

        sampler = ShardedBatches(len(self.dataset), B, self.world, self.rank, int(self.cfg["seed"]))
        micro_per_epoch = sampler.num_batches
        steps_per_epoch = micro_per_epoch // accum
        if steps_per_epoch < 1:
            raise ValueError(f"an epoch has {micro_per_epoch} micro-batches, fewer than grad_accum {accum}")
        total = int(t["max_steps"] or int(t["epochs"]) * steps_per_epoch)
        o = self.cfg["optim"]
        fusion = self.model.config.text
        mult = float(o["fusion_lr_mult"])
        lr_mult = {f"text_encoder.encoder.layer.{i}.": mult for i in range(fusion.fusion_layer,
                                                                           fusion.num_hidden_layers)}
        lr_mult["itm_head."] = mult
        self.optimizer = create_optimizer(self.model, float(o["lr"]), float(o["weight_decay"]),
                                          tuple(o["betas"]), float(o["eps"]), lr_mult if mult != 1.0 else None)
        self.scheduler = CosineWarmup(self.optimizer, total, float(o["lr"]), float(o["min_lr"]),
                                      int(o["warmup_steps"]), o["warmup_lr"])
        self.step, self.bad_items = 0, 0
        resumed = self.resume and self._load_checkpoint()
        if not resumed:
            torch.manual_seed(int(self.cfg["seed"]) + self.rank)  # the official seed + rank
        net: nn.Module = self.objective
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                find_unused_parameters=not t["itm"] or (int(t["scratch_warmup_steps"] or 0) > 0
                                                         and not t["itm_in_warmup"]),
            )
        metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            _truncate_metrics(metrics_path, self.step if resumed else 0)
        bf16 = bool(t["bf16"])
        warmup_steps = int(t["scratch_warmup_steps"] or 0)
        stop_after = self.cfg["debug"].get("stop_after")
        pbar = None
        if self.rank == 0 and self.progress:
            from albef.progress import progress_bar

            pbar = progress_bar(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        acc = _Meter()
        t_start = time.perf_counter()
        t_interval, steps_interval = time.perf_counter(), 0
        start_step = self.step
        log_every = int(self.cfg["log"]["every"])
        while self.step < total:
            epoch, pos = divmod(self.step, steps_per_epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=list(sampler.batches(epoch, pos * accum)), collate_fn=collate,
                num_workers=int(self.cfg["data"]["num_workers"]),
                # Its own generator: creating an iterator draws a worker base seed, which must not come
                # from the global RNG (a resumed run creates one more iterator than an uninterrupted one).
                generator=torch.Generator().manual_seed(int(self.cfg["seed"]) + epoch),
            )
            batches = iter(loader)
            while pos < steps_per_epoch and self.step < total:
                warm = self.step < warmup_steps
                if self.step == warmup_steps and warmup_steps > 0:
                    # End of the from-scratch warm-up: momentum keys start from the online weights.
                    self.objective.momentum_encoders.copy_from(self.model)
                    if t["temp_after_warmup"] is not None:
                        with torch.no_grad():
                            self.model.temp.fill_(float(t["temp_after_warmup"]))
                for j in range(accum):
                    batch = next(batches)
                    micro = pos * accum + j
                    alpha = alpha_at(t, epoch, micro, micro_per_epoch)
                    ids, mask = self._tokenize(batch["caption"])
                    image = batch["image"].to(self.device, non_blocking=True)
                    idx = batch["idx"].to(self.device)
                    sync = contextlib.nullcontext() if (self.world == 1 or j == accum - 1) else net.no_sync()
                    with sync:
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                            out = net(image, ids, mask, idx, alpha, warm)
                        (out["loss"] / accum).backward()
                    acc.add(out, alpha)
                    if batch["bad"]:
                        self.bad_items += len(batch["bad"])
                        for b in batch["bad"]:
                            log.warning("unreadable image replaced by the next item", extra={"item": b})
                    if self.cfg["debug"]["dump_queues"]:
                        self._dump(out, idx)
                if t["grad_clip"]:
                    nn.utils.clip_grad_norm_(self.model.parameters(), float(t["grad_clip"]))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                pos += 1
                steps_interval += 1
                if self.step % log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    rate = steps_interval * B * accum * self.world / max(now - t_interval, 1e-9)
                    rec = acc.summary(self.world)
                    rec.update(step=self.step, epoch=epoch, lr=lr, temp=float(self.model.temp.detach()),
                               samples_per_s=round(rate, 2), bad_items=self.bad_items)
                    if self.rank == 0:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                    acc = _Meter()
                    t_interval, steps_interval = now, 0
                if pbar is not None:
                    pbar.update(1)
                if self.step % int(self.cfg["checkpoint"]["every"]) == 0 or self.step == total:
                    self._save_checkpoint()
                if stop_after and self.step - start_step >= int(stop_after) and self.step < total:
                    if pbar is not None:
                        pbar.close()
                    log.info("stopping early (debug.stop_after)", extra={"step": self.step})
                    return {"step": self.step, "stopped": True}
        if pbar is not None:
            pbar.close()
        elapsed = time.perf_counter() - t_start
        samples = (self.step - start_step) * B * accum * self.world
        summary = {
            "steps": self.step,
            "trained_steps_this_run": self.step - start_step,
            "wall_s": round(elapsed, 1),
            "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
            "world_size": self.world,
            "pairs": len(self.items),
            "skipped_items": len(self.problems) + self.bad_items,
            "threads": torch.get_num_threads(),
        }
        if self.rank == 0:
            self._finish(summary)
        barrier()
        return summary

    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        length = max(1, int(mask.sum(axis=1).max()))  # padding='longest', as the official training
        return (torch.from_numpy(ids[:, :length]).to(self.device),
                torch.from_numpy(mask[:, :length]).to(self.device))

    def _dump(self, out: dict[str, Any], idx: torch.Tensor) -> None:
        q = self.objective.queues
        folder = self.out / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"image_feat_m": out["image_feat_m"].float().cpu(), "text_feat_m": out["text_feat_m"].float().cpu(),
             "idx": idx.cpu(), "image_queue": q.image_queue.cpu().clone(), "text_queue": q.text_queue.cpu().clone(),
             "idx_queue": q.idx_queue.cpu().clone(), "queue_ptr": int(q.queue_ptr)},
            folder / f"rank{self.rank}-step{self.step:06d}.pt",
        )

    def _finish(self, summary: dict[str, Any]) -> None:
        from albef.model.checkpoint import save_albef

        dtype = DTYPES[self.cfg["final"]["dtype"]]
        final = self.final_dir
        save_albef(self.model, final, source={"recipe": self.cfg, "training": summary}, dtype=dtype)
        self.tokenizer.save(final / "tokenizer.json.tmp")
        (final / "tokenizer.json.tmp").replace(final / "tokenizer.json")
        _atomic_write_text(final / "training.json", json.dumps({"config": self.cfg, "summary": summary}, indent=2))
        _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        log.info("final weights written", extra={"path": str(final), **summary})
        split = self.cfg["eval"]["split"]
        data_file = self.cfg["data"].get(split) if split else None
        if data_file:
            report = evaluate_checkpoint(final, data_file, self.cfg["data"]["image_root"],
                                         int(self.cfg["eval"]["k_test"]), int(self.cfg["eval"]["batch_size"]))
            report["training"] = summary
            text = json.dumps(report, indent=2)
            _atomic_write_text(final / "eval.json", text)
            _atomic_write_text(self.out / "eval.json", text)
            summary["eval"] = {"itc": report["itc"], "itm": report["itm"]}


def evaluate_checkpoint(
    checkpoint: str | Path, data_file: str | Path, image_root: str | Path | None, k_test: int, batch_size: int = 64
) -> dict[str, Any]:
    """The official evaluation (helper module ``evaluate``) of a saved checkpoint, loaded as shipped."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.factory import create_model
    from albef.model.text import AlbefTokenizer, default_vocab_path
    from albef.model.train.evaluate import evaluate

    model = create_model(None, checkpoint)
    tok = AlbefTokenizer.from_vocab(default_vocab_path())
    eval_set = load_eval_set(data_file, image_root)
    with torch.no_grad():
        report = evaluate(model, eval_set, tok, k_test=k_test, batch_size=batch_size, progress=False)
    report["checkpoint"] = str(checkpoint)
    report["data"] = str(data_file)
    return report


class _Meter:
    KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc")

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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    _atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []
