"""The training configuration's schema: one pydantic model per recipe section, with defaults, descriptions
and bounds (:mod:`albef.model.train.settings` loads it from defaults, environment, recipe and overrides).
Torch-free."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

# The official RandomAugment op list (kept here so this module stays torch-free).
ALL_OPS = tuple(
    "Identity AutoContrast Equalize Brightness Sharpness ShearX ShearY TranslateX TranslateY Rotate".split()
)

ENV_PREFIX = "ALBEF_TRAIN_"
ENV_NESTED_DELIMITER = "__"

# Mappings whose keys are not fixed by the schema (checked where they are used).
FREE_FORM = {"data.synth"}


class ConfigError(ValueError):
    """A recipe, override or environment variable that does not fit the schema."""


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A path, kept as the string it was written as (a Path given from Python becomes its string).
PathStr = Annotated[str, BeforeValidator(_fspath)]
PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelGroup(_Group):
    config: str = Field("albef-tiny", description="model config: a built-in name or a JSON path")
    image_res: PositiveInt | None = Field(None, description="override the config's image resolution")
    init: PathStr | None = Field(None, description="official .pth or our checkpoint folder; null = random")
    temp: float | None = Field(None, gt=0, description="initial ITC temperature (null = the config's, 0.07)")
    random_init: Literal["torch", "bert"] = Field(
        "torch", description="random initialisation: torch (module defaults) | bert (normal 0.02)"
    )


class DataGroup(_Group):
    train: list[PathStr] = Field(default_factory=list, description="annotation files/folders (load_pairs)")
    image_root: PathStr | None = Field(None, description="folder that relative image paths start from")
    val: PathStr | None = Field(None, description="validation annotation file")
    test: PathStr | None = Field(None, description="test annotation file")
    synth: dict[str, Any] | None = Field(
        None,
        description="generate `albef data synth` data if missing: {root, images, seed, size}; root "
        "defaults to OUT/data (free-form: its keys are checked where it is used)",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cache_images: bool = Field(True, description="decode every image once into memory (finds corrupt ones)")
    max_tokens: PositiveInt = Field(30, description="30 for retrieval, 25 in the official pretraining")
    official_loader: bool = Field(False, description="True: ignore EXIF orientation, as the official code")

    @field_validator("train", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | os.PathLike) else value


class RandAugmentGroup(_Group):
    n: int = Field(2, ge=0, description="RandomAugment ops applied per image")
    m: int = Field(7, ge=0, description="RandomAugment magnitude (the official range is 0-10)")
    ops: list[str] = Field(default_factory=lambda: list(ALL_OPS), description="ops to draw from")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ALL_OPS))
        if unknown:
            raise ValueError(f"unknown RandomAugment ops {unknown}; known: {', '.join(ALL_OPS)}")
        return value


class AugmentGroup(_Group):
    crop_scale: Pair = Field(
        default_factory=lambda: [0.5, 1.0],
        description="[lo, hi] area range of the random resized crop, 0 < lo <= hi <= 1",
    )
    hflip: bool = Field(True, description="random horizontal flip")
    randaugment: RandAugmentGroup | None = Field(default_factory=RandAugmentGroup, description="null = none")

    @field_validator("crop_scale")
    @classmethod
    def _crop_range(cls, value: list[float]) -> list[float]:
        lo, hi = value
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"must satisfy 0 < lo <= hi <= 1, got {lo}, {hi}")
        return value


class TrainGroup(_Group):
    objective: Literal["albef", "truth"] = Field(
        "albef",
        description="albef: the official ITC (momentum distillation, queue) + ITM with mined negatives | "
        "truth: ITC and ITM on labels from the synthetic generator's semantics (TruthObjective; whole "
        "groups per batch)",
    )
    truth_random_negatives: int = Field(
        4, ge=0, description="objective truth: random in-batch images each caption meets besides its group"
    )
    batch_size: PositiveInt = Field(32, description="per process")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    epochs: PositiveInt = Field(1, description="passes over the data (unless max_steps is set)")
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; overrides epochs when set")
    queue_size: PositiveInt = Field(65536, description="ITC feature queue length")
    momentum: Probability = Field(0.995, description="EMA factor of the momentum encoders")
    alpha: Probability = Field(0.4, description="momentum-distillation weight")
    distill: bool = Field(True, description="momentum distillation")
    alpha_warmup: bool = Field(True, description="linear ramp of alpha over the first epoch")
    scratch_warmup_steps: int | None = Field(
        0,
        ge=0,
        description="from scratch only: this many first steps use the two-sided in-batch ITC (see "
        "AlbefObjective.forward), then the momentum encoders are reset to the online weights",
    )
    itm_in_warmup: bool = Field(False, description="also train ITM (in-batch negatives) in the warm-up")
    group_negatives: Probability = Field(
        0.0,
        description="probability that an ITM negative is a known hard negative (a group-mate from the "
        "synthetic generator's scenes.json) instead of the ITC-mined one; > 0 also batches whole groups "
        "together",
    )
    group_negatives_start: int = Field(0, ge=0, description="first step that uses them (before: ITC-mined)")
    itm_pairs_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the contrastive ITM loss over all in-batch pairs (0 = off; from scratch)",
    )
    temp_after_warmup: float | None = Field(None, gt=0, description="temp after the warm-up (null = learned)")
    itm: bool = Field(True, description="image-text matching loss")
    mlm: bool = Field(False, description="masked language modelling loss (mode: pretrain only)")
    mlm_probability: Probability = Field(0.15, description="share of tokens masked for MLM")
    clamp_temp: bool | None = Field(None, description="null = the mode's (pretrain clamps, retrieval not)")
    bf16: bool = Field(False, description="bf16 autocast")
    grad_clip: float | None = Field(None, ge=0, description="gradient-norm clip (null or 0 = none)")
    threads: int | None = Field(None, ge=0, description="torch.set_num_threads (null or 0 = torch's choice)")
    device: str = Field("cpu", description="torch device (cpu, cuda, cuda:N)")


class OptimGroup(_Group):
    lr: float = Field(1e-4, ge=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.02, ge=0, description="AdamW weight decay (official decay groups)")
    min_lr: float = Field(1e-5, ge=0, description="end of the cosine schedule")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    warmup_lr: float | None = Field(None, ge=0, description="learning rate the warm-up starts at; null = lr")
    betas: Pair = Field(default_factory=lambda: [0.9, 0.999], description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    fusion_lr_mult: float = Field(1.0, ge=0, description="learning-rate factor: fusion layers, ITM head")

    @field_validator("betas")
    @classmethod
    def _beta_range(cls, value: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must lie in [0, 1), got {value}")
        return value


class CheckpointGroup(_Group):
    every: PositiveInt = Field(500, description="write a checkpoint every this many steps (and at the end)")
    keep: int = Field(2, description="checkpoints to keep (0 or less = all)")


class LogGroup(_Group):
    every: PositiveInt = Field(10, description="log metrics every this many steps")


class EvalGroup(_Group):
    split: str | None = Field("test", description="evaluate the final model on data.<split>; null = none")
    k_test: PositiveInt = Field(16, description="ITM re-ranks the ITC top k_test")
    batch_size: PositiveInt = Field(64, description="evaluation batch size")


class FinalGroup(_Group):
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="float16 halves the size")


class DebugGroup(_Group):
    dump_queues: bool = Field(False, description="write each rank's momentum features and queues every step")
    stop_after: int | None = Field(None, description="stop after this many steps, as if interrupted (tests)")


class TrainingSchema(BaseModel):
    """The training configuration as a plain model: validation without reading the environment."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["retrieval", "pretrain"] = Field("retrieval", description="retrieval | pretrain")
    seed: int = Field(42, description="seed of initial weights, data order and augmentation")
    model: ModelGroup = Field(default_factory=ModelGroup)
    data: DataGroup = Field(default_factory=DataGroup)
    augment: AugmentGroup = Field(default_factory=AugmentGroup)
    train: TrainGroup = Field(default_factory=TrainGroup)
    optim: OptimGroup = Field(default_factory=OptimGroup)
    checkpoint: CheckpointGroup = Field(default_factory=CheckpointGroup)
    log: LogGroup = Field(default_factory=LogGroup)
    eval: EvalGroup = Field(default_factory=EvalGroup)
    final: FinalGroup = Field(default_factory=FinalGroup)
    debug: DebugGroup = Field(default_factory=DebugGroup)

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainingSchema:
        if self.train.mlm and self.mode != "pretrain":
            raise ValueError("train.mlm needs mode: pretrain (the official retrieval fine-tuning has no MLM)")
        if self.train.objective == "truth":
            if self.mode != "retrieval" or self.train.mlm:
                raise ValueError("train.objective truth is a retrieval objective (mode: retrieval, no MLM)")
            if self.train.scratch_warmup_steps or self.train.group_negatives or self.debug.dump_queues:
                raise ValueError(
                    "train.objective truth has no momentum encoders, queues or mined negatives: set "
                    "train.scratch_warmup_steps and train.group_negatives to 0, debug.dump_queues off"
                )
        if not self.data.train and not self.data.synth:
            raise ValueError("no training data: set data.train (annotation files) or data.synth")
        return self
