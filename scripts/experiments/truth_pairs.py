"""An experiment for issue 13, not the trainer: does a dense, truth-labelled ITM objective make the fusion bind?

The shipped recipe's ITM head sits at the "always no match" prior (docs/model.md §6). This script trains the
same ALBEF model (``albef-tiny-synth``, built by :class:`albef.model.albef.ALBEF`) with a loop of its own, so
that one idea can be tried in minutes:

- batches of whole scene groups (``--groups`` groups of 4: every image with its three swap-mates), one caption
  per image;
- positives from the generator's truth (``scenes.json``): a caption is a positive of every image in the batch
  it is true of, a negative of those it is false of, and ignored where a relation is ambiguous;
- ITC: the two-sided in-batch contrastive loss (no momentum encoders, no queue) on those positives;
- ITM: each caption against its 4 group-mates and ``--rand`` random other images; a softmax over those
  candidates' match margins and a class-balanced binary loss on every pair, all labels from the truth.

``eval`` scores a saved state: the swap suite of its data's val split and the caption-truth P@1 of ITC and
ITC+ITM (top 16) on a held-out split. Run::

    albef data synth /tmp/s60k --images 60000 --seed 0
    python scripts/experiments/truth_pairs.py train --data /tmp/s60k --lr 5e-4 --steps 4000 --save /tmp/tp.pt
    albef data synth /tmp/s777 --images 3000 --seed 777
    python scripts/experiments/truth_pairs.py eval --state /tmp/tp.pt --data /tmp/s777 --split test

Measured in session 21 (AMD EPYC, 2 cores, shared with other jobs): swap suite (val, 600 cases, chance 25) ITM
35.7 / 40.7 / 49.2 / 52.8 at steps 500 / 1000 / 1500 / 2000 (ITC 29.7 -> 40.7; the tiny-synth-pairs recipe
reached 41 at step 4000 with half the batch); caption-truth P@1 on seed 777's test split at step 2274: text->image
16.4 (ITC) -> 29.8 (ITM), image->text 24.0 -> 30.7. Binding rises, but slowly: 2-object groups 29.6 -> 50.8,
3-object groups 25.5 -> 41.7 from step 500 to 2000.

Tried in session 22 (quiet machine, same data, 1000-1500 steps), neither better than the plain config:
8 px patches (64 image tokens) after a 400-step pre-training of the ViT to name the colour, shape and size under
every patch: swap ITM 30.2 / 33.5 at steps 500 / 1000; a 2D sine-cosine initialisation of the ViT's position
embeddings (``--sincos``; timm's default is N(0, 0.02), 30x weaker than the patch features): 31.5 / 37.7.
The trainer's ``train.objective: truth`` (model/train/truth_objective.py) is this loop's objective.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from albef.model.albef import ALBEF
from albef.model.config import get_config
from albef.model.data.scenes import FALSE, TRUE, Clause, caption_truth, parse_caption, scene_from_record
from albef.model.image import normalize, resize
from albef.model.text import AlbefTokenizer, default_vocab_path, pre_caption
from albef.model.train.losses import masked_soft_cross_entropy

CONFIG = Path(__file__).resolve().parents[2] / "model" / "configs" / "albef-tiny-synth.json"
GROUP = 4


class World:
    """One synthetic data folder: scenes, pixels at the model's resolution, captions, parsed clauses."""

    def __init__(self, root: Path, res: int, mean: list[float], std: list[float]) -> None:
        self.records = json.loads((root / "scenes.json").read_text())
        self.scenes = [scene_from_record(r) for r in self.records]
        cache = root / f"pixels_{res}.npy"  # decoding 60k PNGs takes a minute: keep them beside the data
        if cache.exists():
            self.pixels = np.load(cache)
        else:
            self.pixels = np.stack(
                [
                    normalize(resize(Image.open(root / r["image"]).convert("RGB"), res), mean, std)
                    for r in self.records
                ]
            ).astype(np.float16)
            np.save(cache, self.pixels)
        self._parsed: dict[str, list[Clause]] = {}

    def split(self, name: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r["split"] == name]

    def groups(self, name: str) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in self.split(name):
            out.setdefault(self.records[i]["group"], []).append(i)
        return list(out.values())

    def truth(self, caption: str, image: int) -> int:
        if caption not in self._parsed:
            self._parsed[caption] = parse_caption(caption)
        return caption_truth(self._parsed[caption], self.scenes[image])


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on standard output (the progress and the results)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny-synth config with the command line's architecture overrides."""
    cfg = json.loads(CONFIG.read_text())
    v, t = cfg["vision"], cfg["text"]
    v["image_res"] = args.res or v["image_res"]
    v["patch_size"] = args.patch or v["patch_size"]
    v["depth"] = args.vit_depth or v["depth"]
    t["num_hidden_layers"] = args.text_layers or t["num_hidden_layers"]
    t["fusion_layer"] = args.fusion_layer if args.fusion_layer is not None else t["fusion_layer"]
    return cfg


def build_model(cfg: dict[str, Any], state: str | None = None) -> tuple[ALBEF, dict[str, Any]]:
    if state:
        saved = torch.load(state)
        if "cfg" in saved:
            cfg = saved["cfg"]
            saved = saved["state"]
    model = ALBEF(get_config(cfg))
    if state:
        model.load_state_dict(saved)
    return model, cfg


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """2D sine-cosine position embeddings [1 + grid^2, width] (MAE style; the [CLS] row zero): at std ~0.7
    they are as strong as the patch features from the start (timm's default init is N(0, 0.02))."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat([torch.zeros(1, width), torch.cat(parts, 1)], 0)


def tokenize(tok: AlbefTokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tok([pre_caption(t) for t in texts], clean=False)
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    n = int(mask_t.sum(1).max())  # padding past the longest text changes nothing: trim it
    return ids_t[:, :n], mask_t[:, :n]


def match_logits(
    model: ALBEF,
    text_tokens: torch.Tensor,
    mask: torch.Tensor,
    image_tokens: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """ITM logits of the pairs (text t[j], image v[j]); each image's cross-attention K/V computed once."""
    kv = [(k[v], val[v]) for k, val in model.image_kv(image_tokens)]
    return model.itm_head(model.fusion(text_tokens[t], mask[t], image_kv=kv)[:, 0, :])


def swap_suite(
    model: ALBEF, world: World, tok: AlbefTokenizer, split: str, max_cases: int = 600
) -> dict[str, Any]:
    """Accuracy (%) of ITC and ITM at picking the one group member a caption is true of (false of the rest)."""
    cases = []
    for members in world.groups(split):
        if len(members) < 2:
            continue
        for i in members:
            for c in world.records[i]["captions"]:
                tv = [world.truth(c, m) for m in members]
                if tv.count(TRUE) == 1 and tv.count(FALSE) == len(members) - 1:
                    cases.append((c, members, tv.index(TRUE)))
    random.Random(123).shuffle(cases)
    cases = cases[:max_cases]
    hits: dict[str, list[int]] = {"itc": [], "itm": []}
    by_objects: dict[int, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for c, members, right in cases:
            ids, mask = tokenize(tok, [c])
            temb, ttok = model.encode_text(ids, mask)
            iemb, itok = model.encode_image(torch.from_numpy(world.pixels[members].astype(np.float32)))
            n = len(members)
            lg = match_logits(model, ttok, mask, itok, torch.zeros(n, dtype=torch.long), torch.arange(n))
            hits["itc"].append(int((iemb @ temb[0]).argmax()) == right)
            ok = int((lg[:, 1] - lg[:, 0]).argmax()) == right
            hits["itm"].append(ok)
            by_objects.setdefault(len(world.scenes[members[0]].objects), []).append(ok)
    model.train()
    return {
        "cases": len(cases),
        **{k: round(100 * float(np.mean(v)), 1) for k, v in hits.items()},
        "itm_by_objects": {str(k): round(100 * float(np.mean(v)), 1) for k, v in sorted(by_objects.items())},
    }


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    model, cfg = build_model(model_config(args), args.init)
    world = World(Path(args.data), cfg["vision"]["image_res"], cfg["mean"], cfg["std"])
    tok = AlbefTokenizer.from_vocab(default_vocab_path(), max_tokens=cfg["max_tokens"])
    groups = [g for g in world.groups("train") if len(g) == GROUP]
    if args.sincos and not args.init:
        v = cfg["vision"]
        with torch.no_grad():
            model.visual_encoder.pos_embed.copy_(
                sincos_pos_embed(v["width"], v["image_res"] // v["patch_size"])[None]
            )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.02)
    if not args.init:
        with torch.no_grad():
            model.temp.fill_(0.2)
    t_start, history = time.time(), []
    for step in range(1, args.steps + 1):
        members = [i for g in rng.sample(groups, args.groups) for i in g]
        texts = [rng.choice(world.records[i]["captions"]) for i in members]
        b = len(members)
        truth = torch.tensor([[world.truth(t, j) for j in members] for t in texts])  # [text, image]
        pos, known = (truth == TRUE).float(), (truth != 1).float()  # 1: ambiguous relation
        pixels = torch.from_numpy(world.pixels[members].astype(np.float32))
        pixels = torch.roll(pixels, shifts=(rng.randint(-2, 2), rng.randint(-2, 2)), dims=(2, 3))
        ids, mask = tokenize(tok, texts)
        iemb, itok = model.encode_image(pixels)
        temb, ttok = model.encode_text(ids, mask)
        sim = temb @ iemb.t() / model.temp.clamp(0.01, 0.5)
        loss_itc = (masked_soft_cross_entropy(sim, pos) + masked_soft_cross_entropy(sim.t(), pos.t())) / 2
        t_idx, v_idx = [], []
        for t in range(b):
            g0 = (t // GROUP) * GROUP
            others = [j for j in range(b) if not g0 <= j < g0 + GROUP]
            cand = list(range(g0, g0 + GROUP)) + rng.sample(others, args.rand)
            t_idx += [t] * len(cand)
            v_idx += cand
        ti, vi = torch.tensor(t_idx), torch.tensor(v_idx)
        lg = match_logits(model, ttok, mask, itok, ti, vi)
        lab, kn = pos[ti, vi], known[ti, vi]
        n_cand = GROUP + args.rand
        loss_ce = masked_soft_cross_entropy((lg[:, 1] - lg[:, 0]).view(b, n_cand), lab.view(b, n_cand))
        weight = kn * torch.where(lab > 0, n_cand - 1.0, 1.0)  # positives weigh as much as all negatives
        loss_bce = (F.cross_entropy(lg, lab.long(), reduction="none") * weight).sum() / weight.sum()
        loss = loss_itc + loss_ce + loss_bce
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        cosine = 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.95 + 0.05
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup) * cosine
        opt.step()
        if step % 50 == 0:
            emit(
                {
                    "step": step,
                    "s": round(time.time() - t_start),
                    "itc": round(loss_itc.item(), 3),
                    "ce": round(loss_ce.item(), 3),
                    "bce": round(loss_bce.item(), 3),
                    "temp": round(model.temp.item(), 3),
                }
            )
        if step % args.eval_every == 0 or step == args.steps:
            if args.save:
                torch.save({"cfg": cfg, "state": model.state_dict()}, args.save)
            history.append(
                {"step": step, "s": round(time.time() - t_start), **swap_suite(model, world, tok, "val")}
            )
            emit(history[-1])
    emit({"history": history})


def evaluate(args: argparse.Namespace, k: int = 16) -> None:
    torch.set_num_threads(args.threads)
    model, cfg = build_model(json.loads(CONFIG.read_text()), args.state)
    model.eval()
    world = World(Path(args.data), cfg["vision"]["image_res"], cfg["mean"], cfg["std"])
    tok = AlbefTokenizer.from_vocab(default_vocab_path(), max_tokens=cfg["max_tokens"])
    images = world.split(args.split)
    texts = [c for i in images for c in world.records[i]["captions"]]
    truth = np.array([[world.truth(t, i) == TRUE for i in images] for t in texts])
    with torch.no_grad():
        iemb, itok = model.encode_image(torch.from_numpy(world.pixels[images].astype(np.float32)))
        ids, mask = tokenize(tok, texts)
        temb, ttok = model.encode_text(ids, mask)
        sim = (temb @ iemb.t()).numpy()
        out: dict[str, float] = {}
        for name, s, true in (("t2i", sim, truth), ("i2t", sim.T, truth.T)):
            top = np.argsort(-s, 1, kind="stable")[:, :k]
            q = torch.arange(len(top)).repeat_interleave(k)
            c = torch.from_numpy(top.reshape(-1))
            lg = (
                match_logits(model, ttok, mask, itok, q, c)
                if name == "t2i"
                else match_logits(model, ttok, mask, itok, c, q)
            )
            best = top[np.arange(len(top)), (lg[:, 1] - lg[:, 0]).view(-1, k).argmax(1).numpy()]
            rows = np.arange(len(top))
            out[f"{name}_p1_itc"] = round(100 * float(true[rows, top[:, 0]].mean()), 1)
            out[f"{name}_p1_itm"] = round(100 * float(true[rows, best].mean()), 1)
    emit(
        {
            **out,
            "images": len(images),
            "texts": len(texts),
            "swap": swap_suite(model, world, tok, args.split),
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--groups", type=int, default=8)
    t.add_argument("--rand", type=int, default=4)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--init", default=None)
    t.add_argument("--save", default=None)
    t.add_argument("--res", type=int, default=None)
    t.add_argument("--patch", type=int, default=None)
    t.add_argument("--vit-depth", type=int, default=None)
    t.add_argument("--text-layers", type=int, default=None)
    t.add_argument("--fusion-layer", type=int, default=None)
    t.add_argument("--sincos", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("--state", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    main()
