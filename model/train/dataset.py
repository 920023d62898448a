"""Training data: a torch Dataset over ``PairItem`` rows, the train transform, and the deterministic order.

Train transform (docs/model.md §2.6, official ``dataset/__init__.py``): ``RandomResizedCrop(image_res, scale=(0.5, 1),
bicubic)`` -> horizontal flip -> ``RandomAugment(N=2, M=7)`` -> ToTensor -> Normalize (CLIP statistics).
Our RandomAugment is a cheap PIL re-implementation of the official cv2 one: N ops drawn from the list, each
applied with probability 0.5 at the fixed magnitude M (brightness/sharpness factor ``M/10*1.8+0.1``, shear
``M/10*0.3``, translate ``M`` px, rotate ``M/10*30`` degrees with a random sign, grey fill).
Every knob is configurable: a data set whose captions speak about left/right must switch the flip off, and
one whose captions name colours should leave out AutoContrast/Equalize (see the tiny-synth recipe).

Randomness is per sample: the generator of sample ``i`` in epoch ``e`` is seeded from ``(seed, e, i)``, so
an augmentation does not depend on worker count, batch composition or where a resumed run restarted.

Bad images: :func:`scan_images` decodes (or verifies) every image up front and drops unreadable ones,
reporting each with its annotation row and path; if an image still fails at load time, the item is
replaced by the next readable one (reported in the batch's ``bad`` list, counted by the trainer). A run
never dies on one bad item.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset

from albef.model.image import load_image, normalize
from albef.model.train.settings import ALL_OPS

log = logging.getLogger(__name__)

FILL = (128, 128, 128)


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaug_n: int = 2
    randaug_m: int = 7
    randaug_ops: tuple[str, ...] = ALL_OPS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        ra = d.get("randaugment") or {"n": 0}
        ops = tuple(ra.get("ops", ALL_OPS))
        unknown = set(ops) - set(ALL_OPS)
        if unknown:
            raise ValueError(f"unknown RandomAugment ops {sorted(unknown)}; known: {', '.join(ALL_OPS)}")
        lo, hi = d.get("crop_scale", (0.5, 1.0))
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {lo}, {hi}")
        return cls(
            (float(lo), float(hi)), bool(d.get("hflip", True)), int(ra.get("n", 2)), int(ra.get("m", 7)), ops
        )


def _random_resized_crop_box(
    w: int, h: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, ...]:
    """torchvision ``RandomResizedCrop.get_params`` (ratio 3/4..4/3), drawn from ``rng``."""
    area = w * h
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    side = min(w, h)  # fallback: central crop
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def _apply_op(img: Image.Image, op: str, m: int, rng: random.Random) -> Image.Image:
    sign = 1 if rng.random() < 0.5 else -1
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(m / 10 * 1.8 + 0.1)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(m / 10 * 1.8 + 0.1)
    if op in ("ShearX", "ShearY"):
        s = sign * m / 10 * 0.3
        coeffs = (1, s, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(
            img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL
        )
    if op in ("TranslateX", "TranslateY"):
        t = sign * float(m)
        coeffs = (1, 0, t, 0, 1, 0) if op == "TranslateX" else (1, 0, 0, 0, 1, t)
        return img.transform(
            img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL
        )
    if op == "Rotate":
        return img.rotate(sign * m / 10 * 30, resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown op {op}")


class TrainTransform:
    """PIL RGB image + a seeded ``random.Random`` -> float32 tensor [3, R, R]."""

    def __init__(
        self, image_res: int, mean: Sequence[float], std: Sequence[float], aug: AugmentConfig
    ) -> None:
        self.image_res = image_res
        self.mean, self.std = tuple(mean), tuple(std)
        self.aug = aug

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        box = _random_resized_crop_box(img.width, img.height, self.aug.crop_scale, rng)
        img = img.resize((self.image_res, self.image_res), Image.Resampling.BICUBIC, box=box)
        if self.aug.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.aug.randaug_n > 0 and self.aug.randaug_ops:
            for op in rng.choices(self.aug.randaug_ops, k=self.aug.randaug_n):
                if rng.random() < 0.5:
                    img = _apply_op(img, op, self.aug.randaug_m, rng)
        return torch.from_numpy(normalize(img, self.mean, self.std))


def scan_images(
    items: Sequence[Any],
    decode: bool = True,
    exif_transpose: bool = True,
) -> tuple[list[int], list[dict[str, str]], dict[Path, np.ndarray]]:
    """Check every distinct image once. Returns (indices of good items, problems, decoded cache).

    ``decode`` keeps the decoded uint8 arrays (a cache that also serves every epoch without re-reading PNG);
    otherwise PIL's ``verify`` checks the file cheaply. Each problem names the annotation row and path.
    """
    status: dict[Path, str | None] = {}
    cache: dict[Path, np.ndarray] = {}
    good: list[int] = []
    problems: list[dict[str, str]] = []
    for i, item in enumerate(items):
        path = Path(item.image)
        if path not in status:
            try:
                if decode:
                    cache[path] = np.asarray(load_image(path, exif_transpose=exif_transpose), dtype=np.uint8)
                else:
                    with Image.open(path) as im:
                        im.verify()
                status[path] = None
            except Exception as exc:  # unreadable/corrupt/missing: reported, never fatal
                status[path] = f"{type(exc).__name__}: {exc}"
        err = status[path]
        if err is None:
            good.append(i)
        else:
            problems.append({"source": item.source, "path": str(path), "error": err})
            log.warning(
                "skipping unreadable image", extra={"source": item.source, "path": str(path), "error": err}
            )
    return good, problems, cache


@dataclass
class PairDataset(Dataset):
    """Keys are ``(epoch, i)``; returns image tensor, caption, idx and the sources of any skipped item."""

    items: Sequence[Any]
    idx: Sequence[int]
    transform: TrainTransform
    seed: int = 0
    cache: dict[Path, np.ndarray] = field(default_factory=dict)
    exif_transpose: bool = True  # False: the official loader (EXIF orientation ignored)
    groups: Sequence[int] | None = None  # hard-negative group per pair (GroupBatches); None = no groups

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, path: Path) -> Image.Image:
        arr = self.cache.get(path)
        return (
            Image.fromarray(arr) if arr is not None else load_image(path, exif_transpose=self.exif_transpose)
        )

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        bad: list[str] = []
        for attempt in range(len(self.items)):
            j = (i + attempt) % len(self.items)
            item = self.items[j]
            try:
                img = self._image(Path(item.image))
            except Exception as exc:  # corrupt after the scan: report, substitute the next item
                bad.append(f"{item.source} {item.image}: {type(exc).__name__}: {exc}")
                continue
            rng = random.Random(f"{self.seed}/{epoch}/{j}")
            group = int(self.groups[j]) if self.groups is not None else -1
            return {
                "image": self.transform(img, rng),
                "caption": item.caption,
                "idx": int(self.idx[j]),
                "group": group,
                "bad": bad,
            }
        raise RuntimeError("no readable image in the data set")


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "idx": torch.tensor([b["idx"] for b in batch], dtype=torch.long),
        "group": torch.tensor([b["group"] for b in batch], dtype=torch.long),
        "bad": [s for b in batch for s in b["bad"]],
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of epoch ``epoch``: a function of (seed, epoch) only, identical on every rank."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class ShardedBatches:
    """DistributedSampler-like deterministic batches for one rank, ``drop_last``.

    Epoch order = :func:`epoch_order`; rank r takes ``order[r::world]`` cut to the same length on every
    rank; micro-batch k of that shard is ``shard[k*B:(k+1)*B]``. ``start`` skips the first micro-batches
    (resume) without touching the data.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int) -> None:
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.per_rank = n // world
        self.num_batches = self.per_rank // batch_size
        if self.num_batches == 0:
            raise ValueError(f"{n} training pairs are too few for batch {batch_size} x {world} process(es)")

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        shard = epoch_order(self.n, self.seed, epoch)[self.rank :: self.world][: self.per_rank]
        for k in range(start, self.num_batches):
            yield [(epoch, i) for i in shard[k * self.batch_size : (k + 1) * self.batch_size]]


class GroupBatches:
    """Batches of whole scene groups, for training with known hard negatives (``train.group_negatives``).

    A group is a set of images known to be hard negatives of each other (the synthetic generator's swap-mates:
    same objects, one relation or attribute changed). Each epoch visits every image once: the groups in a
    seeded order (rank r takes ``order[r::world]``), each image with one of its captions drawn from
    ``(seed, epoch, image)``; consecutive images are cut into micro-batches of ``batch_size``, so a batch holds
    whole groups (one may be split at the batch boundary). Like :class:`ShardedBatches` it is a function of
    (seed, epoch) only, and ``start`` skips micro-batches for a resume.
    """

    def __init__(
        self, idx: Sequence[int], groups: Sequence[int], batch_size: int, world: int, rank: int, seed: int
    ) -> None:
        if len(idx) != len(groups):
            raise ValueError("one group per training pair is needed")
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        captions: dict[int, list[int]] = {}  # image idx -> its pairs
        members: dict[int, list[int]] = {}  # group -> its images, in first-seen order
        for i, (image, group) in enumerate(zip(idx, groups, strict=True)):
            if image not in captions:
                members.setdefault(int(group), []).append(int(image))
            captions.setdefault(int(image), []).append(i)
        self.captions, self.members = captions, members
        self.group_ids = sorted(members)
        shards = [self.group_ids[r::world] for r in range(world)]
        per_rank = min(sum(len(members[g]) for g in s) for s in shards)
        self.num_batches = per_rank // batch_size
        if self.num_batches == 0:
            raise ValueError(
                f"{len(captions)} training images are too few for batch {batch_size} x {world} process(es)"
            )

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(len(self.group_ids), self.seed, epoch)
        mine = [self.group_ids[k] for k in order[self.rank :: self.world]]
        pairs = []
        for g in mine:
            for image in self.members[g]:
                options = self.captions[image]
                pairs.append(options[random.Random(f"{self.seed}/{epoch}/{image}").randrange(len(options))])
        for k in range(start, self.num_batches):
            yield [(epoch, i) for i in pairs[k * self.batch_size : (k + 1) * self.batch_size]]
