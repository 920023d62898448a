"""The training loop behind ``albef train``: one code path for a single CPU process and ``torchrun`` DDP.

Per optimizer step: ``grad_accum`` micro-batches (DDP gradient sync only on the last), each running
:class:`~albef.model.train.objective.AlbefObjective` (EMA update, momentum features, ITC, enqueue, ITM, MLM)
under optional bf16 autocast; then AdamW and the step-based cosine schedule. Every ``checkpoint.every``
steps a checkpoint folder is written atomically (temp name, then rename; layout in
:mod:`albef.model.train.checkpoints`).

``--resume`` reloads all of it. The data order is a function of (seed, epoch) and augmentation is seeded
per sample, so a resumed run takes exactly the batches and random draws of an uninterrupted one.
Metrics go to ``OUT/metrics.jsonl`` (rank 0), progress to a tqdm bar (loss, lr, samples/s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from albef.model.train.checkpoints import load_training_state, save_training_state, truncate_metrics
from albef.model.train.distributed import barrier, init_weights, setup_distributed
from albef.model.train.momentum import check_queue_size, rank, world_size
from albef.model.train.outputs import LossMeter, write_final

log = logging.getLogger(__name__)


def alpha_at(cfg_train: dict[str, Any], epoch: int, micro: int, micro_per_epoch: int) -> float:
    """The official ramp: ``alpha * min(1, i / len(loader))`` in epoch 0, ``alpha`` afterwards."""
    alpha = float(cfg_train["alpha"])
    if cfg_train["alpha_warmup"] and epoch == 0:
        return alpha * min(1.0, micro / micro_per_epoch)
    return alpha


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

                generate(
                    root,
                    int(s.get("images", 1000)),
                    int(s.get("seed", 0)),
                    int(s.get("size", 128)),
                    overwrite=True,
                    progress=self.progress,
                )
            barrier()
            d = {
                **d,
                "train": d["train"] or [str(root / "train.json")],
                "val": d["val"] or str(root / "val.json"),
                "test": d["test"] or str(root / "test.json"),
            }
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
        t = self.cfg["train"]
        truth = t["objective"] == "truth"
        scenes = self._scenes(items, d["train"]) if truth or float(t["group_negatives"]) > 0 else None
        self.groups = [s.group for s in scenes] if scenes is not None else None
        # objective truth: the scene of each image (idx), to label every in-batch pair
        self.scene_of = dict(zip(idx, scenes, strict=True)) if truth and scenes is not None else None
        self.dataset = PairDataset(
            items,
            idx,
            transform,
            seed=int(self.cfg["seed"]),
            cache=cache,
            exif_transpose=exif,
            groups=self.groups,
        )
        log.info(
            "training data",
            extra={"pairs": len(items), "images": len(set(idx)), "skipped": len(self.problems)},
        )

    @staticmethod
    def _scenes(items: list[Any], train_files: list[str]) -> list[Any]:
        """The generator's scene (with its group) of every pair, from scenes.json beside the training files."""
        from albef.model.data.synth import image_scenes

        known: dict[str, Any] = {}
        for f in train_files:
            folder = Path(f) if Path(f).is_dir() else Path(f).parent
            known.update(image_scenes(folder))
        # PairItem.image is already absolute and resolved, like the keys of image_scenes
        missing = [str(it.image) for it in items if str(it.image) not in known]
        if missing:
            raise ValueError(
                f"train.group_negatives / train.objective truth: {len(missing)} training images have no "
                f"scene in scenes.json (first: {missing[0]})"
            )
        return [known[str(it.image)] for it in items]

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
        self.model = model
        if t["objective"] == "truth":
            from albef.model.train.truth_objective import TruthObjective

            self.objective = TruthObjective(model, int(t["truth_random_negatives"])).to(self.device)
        else:
            from albef.model.train.objective import AlbefObjective

            self.objective = AlbefObjective(
                model,
                self.cfg["mode"],
                t["queue_size"],
                t["momentum"],
                t["distill"],
                t["itm"],
                t["mlm"],
                t["mlm_probability"],
                t["clamp_temp"],
                t["itm_in_warmup"],
                float(t["group_negatives"]),
                float(t["itm_pairs_weight"]),
            ).to(self.device)
        self.objective.train()

    def _build_tokenizer(self) -> None:
        from albef.model.text import AlbefTokenizer, default_vocab_path

        self.tokenizer = AlbefTokenizer.from_vocab(
            default_vocab_path(), max_tokens=int(self.cfg["data"]["max_tokens"])
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self) -> None:
        save_training_state(self)

    def _load_checkpoint(self) -> bool:
        return load_training_state(self)

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``epochs``), checkpointing as configured; returns the run's summary."""
        t = self.cfg["train"]
        self._setup()
        B, accum = int(t["batch_size"]), int(t["grad_accum"])
        sampler = self._sampler(B)
        micro_per_epoch = sampler.num_batches
        steps_per_epoch = micro_per_epoch // accum
        if steps_per_epoch < 1:
            raise ValueError(f"an epoch has {micro_per_epoch} micro-batches, fewer than grad_accum {accum}")
        total = int(t["max_steps"] or int(t["epochs"]) * steps_per_epoch)
        self._build_optimizer(total)
        self.step, self.bad_items = 0, 0
        resumed = self.resume and self._load_checkpoint()
        if not resumed:
            torch.manual_seed(int(self.cfg["seed"]) + self.rank)  # the official seed + rank
        net = self._wrap_ddp()
        self.metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            truncate_metrics(self.metrics_path, self.step if resumed else 0)
        warmup_steps = int(t["scratch_warmup_steps"] or 0)
        stop_after = self.cfg["debug"].get("stop_after")
        pbar = None
        if self.rank == 0 and self.progress:
            from albef.progress import progress_bar

            pbar = progress_bar(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self._meter = LossMeter()
        t_start = time.perf_counter()
        self._interval = (time.perf_counter(), 0)
        start_step = self.step
        while self.step < total:
            epoch, pos = divmod(self.step, steps_per_epoch)
            batches = iter(self._loader(sampler, epoch, pos * accum))
            while pos < steps_per_epoch and self.step < total:
                warm = self.step < warmup_steps
                if self.step == warmup_steps and warmup_steps > 0:
                    self._end_scratch_warmup()
                for j in range(accum):
                    self._micro_step(
                        net,
                        next(batches),
                        j,
                        accum,
                        alpha_at(t, epoch, pos * accum + j, micro_per_epoch),
                        warm,
                    )
                self._optimizer_step()
                pos += 1
                self._log_metrics(epoch, total, B * accum * self.world, pbar)
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

    # ------------------------------------------------------------------------------------------ run steps

    def _setup(self) -> None:
        """Threads, the process group, the model, the tokenizer and the data."""
        from albef.model.precision import require_native

        t = self.cfg["train"]
        if t["threads"]:
            torch.set_num_threads(int(t["threads"]))
        self.device = setup_distributed(str(t["device"]))
        if t["bf16"] and self.device.type == "cpu":
            # bf16 autocast on a CPU without bf16 instructions runs about 100x slower than fp32: refuse it.
            require_native("bfloat16", "train.bf16=true")
        self.rank, self.world = rank(), world_size()
        check_queue_size(int(t["queue_size"]), int(t["batch_size"]) * self.world)
        self.out.mkdir(parents=True, exist_ok=True)
        self._build_model()
        self._build_tokenizer()
        self._prepare_data()

    def _sampler(self, batch_size: int) -> Any:
        from albef.model.train.dataset import GroupBatches, ShardedBatches

        seed = int(self.cfg["seed"])
        if self.groups is not None:
            return GroupBatches(self.dataset.idx, self.groups, batch_size, self.world, self.rank, seed)
        return ShardedBatches(len(self.dataset), batch_size, self.world, self.rank, seed)

    def _loader(self, sampler: Any, epoch: int, start: int) -> torch.utils.data.DataLoader:
        from albef.model.train.dataset import collate

        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=list(sampler.batches(epoch, start)),
            collate_fn=collate,
            num_workers=int(self.cfg["data"]["num_workers"]),
            # Its own generator: creating an iterator draws a worker base seed, which must not come
            # from the global RNG (a resumed run creates one more iterator than an uninterrupted one).
            generator=torch.Generator().manual_seed(int(self.cfg["seed"]) + epoch),
        )

    def _build_optimizer(self, total: int) -> None:
        """AdamW with the fusion layers and the ITM head at ``fusion_lr_mult`` x lr, cosine schedule."""
        from albef.model.train.optim import CosineWarmup, create_optimizer

        o = self.cfg["optim"]
        text = self.model.config.text
        mult = float(o["fusion_lr_mult"])
        lr_mult = {
            f"text_encoder.encoder.layer.{i}.": mult for i in range(text.fusion_layer, text.num_hidden_layers)
        }
        lr_mult["itm_head."] = mult
        self.optimizer = create_optimizer(
            self.model,
            float(o["lr"]),
            float(o["weight_decay"]),
            tuple(o["betas"]),
            float(o["eps"]),
            lr_mult if mult != 1.0 else None,
        )
        self.scheduler = CosineWarmup(
            self.optimizer, total, float(o["lr"]), float(o["min_lr"]), int(o["warmup_steps"]), o["warmup_lr"]
        )

    def _wrap_ddp(self) -> nn.Module:
        t = self.cfg["train"]
        if self.world == 1:
            return self.objective
        return nn.parallel.DistributedDataParallel(
            self.objective,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=not t["itm"]
            or (int(t["scratch_warmup_steps"] or 0) > 0 and not t["itm_in_warmup"]),
        )

    def _end_scratch_warmup(self) -> None:
        """End of the from-scratch warm-up: momentum keys start from the online weights."""
        self.objective.momentum_encoders.copy_from(self.model)
        temp = self.cfg["train"]["temp_after_warmup"]
        if temp is not None:
            with torch.no_grad():
                self.model.temp.fill_(float(temp))

    def _micro_step(
        self, net: nn.Module, batch: dict[str, Any], j: int, accum: int, alpha: float, warm: bool
    ) -> None:
        """Forward and backward of one micro-batch (gradients synchronised on the last one only)."""
        ids, mask = self._tokenize(batch["caption"])
        image = batch["image"].to(self.device, non_blocking=True)
        idx = batch["idx"].to(self.device)
        use_groups = self.groups is not None and self.step >= int(self.cfg["train"]["group_negatives_start"])
        group = batch["group"].to(self.device) if use_groups else None
        sync = contextlib.nullcontext() if (self.world == 1 or j == accum - 1) else net.no_sync()
        with sync:
            with torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=bool(self.cfg["train"]["bf16"])
            ):
                if self.scene_of is not None:
                    true, false = self._truth(batch["caption"], batch["idx"])
                    out = net(image, ids, mask, true, false, batch["group"].to(self.device))
                else:
                    out = net(image, ids, mask, idx, alpha, warm, group)
            (out["loss"] / accum).backward()
        self._meter.add(out, alpha)
        if batch["bad"]:
            self.bad_items += len(batch["bad"])
            for b in batch["bad"]:
                log.warning("unreadable image replaced by the next item", extra={"item": b})
        if self.cfg["debug"]["dump_queues"]:
            self._dump(out, idx)

    def _truth(self, captions: list[str], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[texts, images] bool: each caption clearly true / false of each batch image (its scene's meaning)."""
        from albef.model.data.truth import truth_table

        assert self.scene_of is not None
        scenes = [self.scene_of[int(i)] for i in idx]
        table = truth_table(scenes, captions, [s.group for s in scenes])
        return torch.from_numpy(table.true).to(self.device), torch.from_numpy(table.false).to(self.device)

    def _optimizer_step(self) -> None:
        clip = self.cfg["train"]["grad_clip"]
        if clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        started, steps = self._interval
        self._interval = (started, steps + 1)

    def _log_metrics(self, epoch: int, total: int, samples_per_step: int, pbar: Any) -> None:
        """Every ``log.every`` steps (and the last): the interval's mean losses and speed to metrics.jsonl."""
        if self.step % int(self.cfg["log"]["every"]) and self.step != total:
            return
        now = time.perf_counter()
        started, steps = self._interval
        rate = steps * samples_per_step / max(now - started, 1e-9)
        rec = self._meter.summary(self.world)
        rec.update(
            step=self.step,
            epoch=epoch,
            lr=self._last_lr,
            temp=float(self.model.temp.detach()),
            samples_per_s=round(rate, 2),
            bad_items=self.bad_items,
        )
        if self.rank == 0:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if pbar is not None:
                pbar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{self._last_lr:.2e}", sps=f"{rate:.0f}")
        self._meter = LossMeter()
        self._interval = (now, 0)

    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        length = max(1, int(mask.sum(axis=1).max()))  # padding='longest', as the official training
        return (
            torch.from_numpy(ids[:, :length]).to(self.device),
            torch.from_numpy(mask[:, :length]).to(self.device),
        )

    def _dump(self, out: dict[str, Any], idx: torch.Tensor) -> None:
        q = self.objective.queues
        folder = self.out / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "image_feat_m": out["image_feat_m"].float().cpu(),
                "text_feat_m": out["text_feat_m"].float().cpu(),
                "idx": idx.cpu(),
                "image_queue": q.image_queue.cpu().clone(),
                "text_queue": q.text_queue.cpu().clone(),
                "idx_queue": q.idx_queue.cpu().clone(),
                "queue_ptr": int(q.queue_ptr),
            },
            folder / f"rank{self.rank}-step{self.step:06d}.pt",
        )

    def _finish(self, summary: dict[str, Any]) -> None:
        write_final(self, summary)
