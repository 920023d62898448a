"""Training configuration: pydantic models with defaults, the environment, YAML recipes and overrides.

:class:`TrainingConfig` is the schema: one group per section of a recipe (``model``, ``data``, ``augment``,
``train``, ``optim``, ``checkpoint``, ``log``, ``eval``, ``final``, ``debug``), each field with its default,
a description and its bounds. :func:`load_config` builds it with this precedence, lowest first:

1. the defaults declared here (:data:`DEFAULTS` is them as a plain dict);
2. the environment, ``ALBEF_TRAIN_<GROUP>__<FIELD>`` (``ALBEF_TRAIN_TRAIN__BATCH_SIZE=8``,
   ``ALBEF_TRAIN_SEED=1``; a list or mapping as JSON; ``null`` for None; empty = unset);
3. the YAML recipe (it only states what differs);
4. ``key.path=value`` overrides from the command line (the value parsed as YAML).

Unknown keys are errors (a typo must not be silently ignored), except inside the free-form ``data.synth``.
Every problem is a :class:`ConfigError` naming the dotted key. The result is the nested plain dict the
trainer reads. Relative paths are resolved against the current working directory. Torch-free.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

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
        if not self.data.train and not self.data.synth:
            raise ValueError("no training data: set data.train (annotation files) or data.synth")
        return self


class _EnvSource(EnvSettingsSource):
    """The environment source, which also reports variables under the prefix that name no field and parses
    the values of ``ALBEF_TRAIN_DATA__SYNTH__<KEY>`` as YAML (the free-form ``data.synth``)."""

    def __call__(self) -> dict[str, Any]:
        try:
            values = super().__call__()
        except SettingsError as exc:  # a list or mapping that is not valid JSON
            found = re.search(r'field "(\w+)"', str(exc))
            field = found[1] if found else "?"
            var = f"{ENV_PREFIX}{field.upper()}"
            raise ConfigError(
                f"config key {field!r} (from the environment, {var} or {var}{ENV_NESTED_DELIMITER}*): cannot "
                f"parse a value ({exc.__cause__ or exc}); a list or mapping is written as JSON there"
            ) from exc
        # Variables under the prefix that name no group or field: unknown keys, as in a recipe.
        prefix = self.env_prefix.lower()
        for name, value in self.env_vars.items():
            rest = name[len(prefix) :] if name.startswith(prefix) else None
            if rest is not None and rest.split(ENV_NESTED_DELIMITER, 1)[0] not in TrainingSchema.model_fields:
                values.setdefault(rest.replace(ENV_NESTED_DELIMITER, "."), value)
        # ALBEF_TRAIN_DATA__SYNTH__<KEY>: no schema types these values; parse them as YAML, as overrides are.
        data = values.get("data")
        synth = data.get("synth") if isinstance(data, dict) else None
        if isinstance(synth, dict):
            d = ENV_NESTED_DELIMITER
            leaf = f"{prefix}data{d}synth{d}"
            data["synth"] = {k: _env_yaml(v) if leaf + k in self.env_vars else v for k, v in synth.items()}
        return values


def _env_yaml(value: Any) -> Any:
    import yaml

    try:
        return _yaml_value(value) if isinstance(value, str) else value
    except yaml.YAMLError:
        return value


class TrainingConfig(BaseSettings, TrainingSchema):
    """:class:`TrainingSchema` with the environment under it: ``ALBEF_TRAIN_<GROUP>__<FIELD>``.

    Keyword arguments (the recipe and overrides, see :func:`load_config`) are deep-merged over the
    environment, which is merged over the defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        env_ignore_empty=True,
        env_parse_none_str="null",
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **_: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls)  # no .env file, no secrets folder


# The declared defaults as a plain dict (no environment read).
DEFAULTS: dict[str, Any] = TrainingSchema.model_construct().model_dump()


# -- errors ----------------------------------------------------------------------------------------------


def _group_of(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (``RandAugmentGroup | None`` -> RandAugmentGroup), else None."""
    args = typing.get_args(annotation) or (annotation,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _key(loc: tuple[int | str, ...], unknown: bool) -> list[str]:
    """The dotted-key parts of an error location (union members' tags dropped; list indices as ``[i]``)."""
    parts: list[str] = []
    cls: type[BaseModel] | None = TrainingSchema
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if parts:
                parts[-1] += f"[{part}]"
            cls = None
        elif cls is not None and part in cls.model_fields:
            parts.append(part)
            cls = _group_of(cls.model_fields[part].annotation)
        elif unknown and i == len(loc) - 1:
            parts.append(part)
        else:
            break
    return parts


def _given(tree: Any, parts: list[str]) -> bool:
    for part in parts:
        name = part.split("[", 1)[0]
        if not isinstance(tree, dict) or name not in tree:
            return False
        tree = tree[name]
    return True


def _message(err: dict[str, Any], given: dict[str, Any] | None) -> str:
    unknown = err["type"] == "extra_forbidden"
    parts = _key(tuple(err["loc"]), unknown)
    key = ".".join(parts)
    error = err.get("ctx", {}).get("error") if err["type"] == "value_error" else None
    reason = str(error) if error is not None else err["msg"][:1].lower() + err["msg"][1:]
    if not key:
        return reason
    if unknown:
        text = f"unknown config key {key!r}"
    elif err["type"] == "model_type":
        text = f"config key {key!r} must be a mapping"
    elif err["type"] == "value_error":
        text = f"config key {key!r}: {reason}"
    else:
        text = f"config key {key!r}: {reason}, got {err['input']!r}"
    if given is not None and not _given(given, parts):  # neither the recipe nor an override: the environment
        names = [p.split("[", 1)[0].upper() for p in key.split(".")]
        text += f" (from the environment, {ENV_PREFIX}{ENV_NESTED_DELIMITER.join(names)})"
    return text


def _config_error(exc: ValidationError, given: dict[str, Any] | None) -> ConfigError:
    return ConfigError("; ".join(dict.fromkeys(_message(e, given) for e in exc.errors())))


# -- recipes and overrides -------------------------------------------------------------------------------


def merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``update`` over a copy of ``base``; a key that ``base`` does not have is an error (but under
    :data:`FREE_FORM` mappings)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}")
        if where in FREE_FORM and isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**base[key], **copy.deepcopy(value)}
        elif isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, where + ".")
        elif isinstance(base[key], dict) and value is not None and where not in FREE_FORM:
            raise ConfigError(f"config key {where!r} must be a mapping")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key (no schema: it is checked once everything is merged); others replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yaml_value(raw: str) -> Any:
    import yaml

    return yaml.safe_load(raw) if raw != "" else None


def parse_override(text: str) -> dict[str, Any]:
    """``train.batch_size=8`` -> ``{"train": {"batch_size": 8}}`` (the value is parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_value(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({exc})") from exc
    parts = key.strip().split(".")
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _read_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def load_settings(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """The validated :class:`TrainingConfig`: defaults < environment < the recipe at ``path`` < overrides."""
    given = _read_recipe(path) if path is not None else {}
    for text in overrides:
        given = _deep_update(given, parse_override(text))
    for key in given:  # (not passed on: BaseSettings takes `_env_prefix` and the like as options)
        if not isinstance(key, str) or key.startswith("_"):
            raise ConfigError(f"unknown config key {key!r}")
    try:
        return TrainingConfig(**given)
    except ValidationError as exc:
        raise _config_error(exc, given) from exc


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The training configuration as the nested plain dict the trainer reads (see :func:`load_settings`)."""
    return load_settings(path, overrides).model_dump()


def validate(cfg: dict[str, Any]) -> None:
    """Check a configuration dict against the schema (the environment is not read); raise ConfigError."""
    try:
        TrainingSchema.model_validate(cfg)
    except ValidationError as exc:
        raise _config_error(exc, None) from exc
