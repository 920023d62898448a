"""Training configuration: YAML recipes merged over defaults, ``key.path=value`` overrides, validation.

A recipe only states what differs from :data:`DEFAULTS`; unknown keys are errors (a typo must not be
silently ignored). Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

# The official RandomAugment op list (kept here so this module stays torch-free).
ALL_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)

DEFAULTS: dict[str, Any] = {
    "mode": "retrieval",  # retrieval | pretrain
    "seed": 42,
    "model": {
        "config": "albef-tiny",  # built-in name or JSON path
        "image_res": None,  # override the config's resolution
        "init": None,  # official .pth or our checkpoint folder; null = random initialisation
        "temp": None,  # initial ITC temperature (null = the model config's, 0.07)
        "random_init": "torch",  # random initialisation: torch (module defaults) | bert (normal 0.02)
    },
    "data": {
        "train": [],  # annotation files/folders (see albef.model.data.annotations.load_pairs)
        "image_root": None,
        "val": None,
        "test": None,
        # Generate `albef data synth` data if missing: {root, images, seed, size}; root defaults to OUT/data.
        "synth": None,
        "num_workers": 0,
        "cache_images": True,  # decode every image once into memory (also detects corrupt files up front)
        "max_tokens": 30,  # 30 for retrieval, 25 in the official pretraining
        "official_loader": False,  # True: ignore EXIF orientation, as the official loader does
    },
    "augment": {
        "crop_scale": [0.5, 1.0],
        "hflip": True,
        "randaugment": {"n": 2, "m": 7, "ops": list(ALL_OPS)},
    },
    "train": {
        "batch_size": 32,  # per process
        "grad_accum": 1,
        "epochs": 1,
        "max_steps": None,  # optimizer steps; overrides epochs when set
        "queue_size": 65536,
        "momentum": 0.995,
        "alpha": 0.4,
        "distill": True,
        "alpha_warmup": True,  # linear ramp of alpha over the first epoch
        # From scratch only: this many first steps use the two-sided in-batch ITC (see
        # AlbefObjective.forward), then the momentum encoders are reset to the online weights.
        "scratch_warmup_steps": 0,
        "itm_in_warmup": False,  # also train ITM (online in-batch negatives) during the warm-up
        # Probability that an ITM negative is a known hard negative (a group-mate from the synthetic
        # generator's scenes.json) instead of the ITC-mined one; > 0 also batches whole groups together.
        "group_negatives": 0.0,
        "group_negatives_start": 0,  # first step that uses them (before it, ITC-mined negatives only)
        "temp_after_warmup": None,  # set temp to this value when the warm-up ends (null = keep the learned one)
        "itm": True,
        "mlm": False,
        "mlm_probability": 0.15,
        "clamp_temp": None,  # null = the mode's default (pretrain clamps, retrieval does not)
        "bf16": False,  # bf16 autocast
        "grad_clip": None,
        "threads": None,  # torch.set_num_threads
        "device": "cpu",
    },
    "optim": {
        "lr": 1e-4,
        "weight_decay": 0.02,
        "min_lr": 1e-5,
        "warmup_steps": 0,
        "warmup_lr": None,  # null = lr
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "fusion_lr_mult": 1.0,  # learning-rate factor for the fusion layers and the ITM head
    },
    "checkpoint": {"every": 500, "keep": 2},
    "log": {"every": 10},
    "eval": {
        "split": "test",  # evaluate the final model on data.<split>; null = no evaluation
        "k_test": 16,
        "batch_size": 64,
    },
    "final": {"dtype": "float32"},  # dtype of the final weights (float16 halves the shipped size)
    # dump_queues: write each rank's momentum features and queues after every step (tests);
    # stop_after: stop after this many steps of this run, as if interrupted (tests of --resume).
    "debug": {"dump_queues": False, "stop_after": None},
}


# Mappings whose keys are not fixed by DEFAULTS (checked where they are used).
FREE_FORM = {"data.synth"}


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}")
        if where in FREE_FORM and isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = {**base[key], **copy.deepcopy(value)}
        elif isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, where + ".")
        elif isinstance(base[key], dict) and value is not None and where != "data.synth":
            raise ConfigError(f"config key {where!r} must be a mapping")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.batch_size=8`` -> ``{"train": {"batch_size": 8}}`` (the value is parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({exc})") from exc
    parts = key.strip().split(".")
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        cfg = merge(cfg, data)
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    if cfg["mode"] not in ("retrieval", "pretrain"):
        raise ConfigError(f"mode must be 'retrieval' or 'pretrain', not {cfg['mode']!r}")
    t = cfg["train"]
    if t["mlm"] and cfg["mode"] != "pretrain":
        raise ConfigError("train.mlm needs mode: pretrain (the official retrieval fine-tuning has no MLM)")
    for key in ("batch_size", "grad_accum", "epochs", "queue_size"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {t[key]!r}")
    if t["max_steps"] is not None and (not isinstance(t["max_steps"], int) or t["max_steps"] < 1):
        raise ConfigError(f"train.max_steps must be a positive integer or null, got {t['max_steps']!r}")
    if not 0 <= float(t["group_negatives"]) <= 1:
        raise ConfigError(f"train.group_negatives is a probability in [0, 1], got {t['group_negatives']!r}")
    if not 0 <= float(t["alpha"]) <= 1 or not 0 <= float(t["momentum"]) <= 1:
        raise ConfigError("train.alpha and train.momentum must lie in [0, 1]")
    if not cfg["data"]["train"] and not cfg["data"]["synth"]:
        raise ConfigError("no training data: set data.train (annotation files) or data.synth")
    if cfg["final"]["dtype"] not in ("float32", "float16", "bfloat16"):
        raise ConfigError("final.dtype must be float32, float16 or bfloat16")
    if int(cfg["checkpoint"]["every"]) < 1 or int(cfg["log"]["every"]) < 1:
        raise ConfigError("checkpoint.every and log.every must be >= 1")
