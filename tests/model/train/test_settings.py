"""The training configuration (albef.model.train.settings): defaults < environment < recipe < overrides,
unknown keys and bad values as ConfigError naming the dotted key, the free-form data.synth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from albef.model.train.settings import (
    ALL_OPS,
    DEFAULTS,
    ConfigError,
    TrainingConfig,
    TrainingSchema,
    load_config,
    validate,
)
from tests.helpers import REPO

DATA = ["data.train=[x.json]"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in os.environ if k.upper().startswith("ALBEF_TRAIN_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_schemas_as_a_plain_dict() -> None:
    # the schema's own defaults (alone they are no valid config: no training data)
    with_data = TrainingSchema(data={"train": ["x.json"]}).model_dump()
    assert with_data == {**DEFAULTS, "data": {**DEFAULTS["data"], "train": ["x.json"]}}
    assert DEFAULTS["train"]["batch_size"] == 32 and DEFAULTS["optim"]["lr"] == 1e-4
    assert DEFAULTS["augment"]["crop_scale"] == [0.5, 1.0]
    assert DEFAULTS["augment"]["randaugment"]["ops"] == list(ALL_OPS)
    cfg = load_config(None, DATA)
    for value in (cfg["augment"]["crop_scale"], cfg["optim"]["betas"], cfg["augment"]["randaugment"]["ops"]):
        assert type(value) is list
    assert cfg == {**DEFAULTS, "data": {**DEFAULTS["data"], "train": ["x.json"]}}


def test_every_field_has_a_description() -> None:
    missing = []

    def walk(cls: type[BaseModel], where: str) -> None:
        for name, field in cls.model_fields.items():
            sub = field.annotation
            subs = [
                a
                for a in getattr(sub, "__args__", (sub,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            if subs:
                walk(subs[0], f"{where}{name}.")
            elif not field.description:
                missing.append(where + name)

    walk(TrainingSchema, "")
    assert not missing


def test_an_environment_variable_reaches_a_nested_field(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE", "8")
    clean_environment.setenv("ALBEF_TRAIN_AUGMENT__RANDAUGMENT__M", "3")
    clean_environment.setenv("ALBEF_TRAIN_AUGMENT__CROP_SCALE", "[0.6, 1]")
    clean_environment.setenv("ALBEF_TRAIN_SEED", "7")
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__MAX_STEPS", "null")
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__EPOCHS", "")  # empty: unset
    cfg = load_config(None, DATA)
    assert cfg["train"]["batch_size"] == 8 and cfg["augment"]["randaugment"]["m"] == 3
    assert cfg["augment"]["crop_scale"] == [0.6, 1.0] and cfg["seed"] == 7
    assert cfg["train"]["max_steps"] is None and cfg["train"]["epochs"] == 1
    assert cfg["train"]["queue_size"] == DEFAULTS["train"]["queue_size"]  # the rest of the group: defaults


def test_the_recipe_beats_the_environment_and_overrides_beat_the_recipe(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE", "8")
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__EPOCHS", "3")
    path = recipe(tmp_path, "data: {train: [a.json]}\ntrain:\n  batch_size: 16\n  grad_accum: 2\n")
    cfg = load_config(path)
    assert cfg["train"]["batch_size"] == 16  # recipe over environment
    assert cfg["train"]["epochs"] == 3  # a group is merged key by key: the environment's other keys stay
    assert cfg["train"]["grad_accum"] == 2
    cfg = load_config(path, ["train.batch_size=4", "train.epochs=5"])
    assert cfg["train"]["batch_size"] == 4 and cfg["train"]["epochs"] == 5 and cfg["train"]["grad_accum"] == 2
    assert cfg["data"]["train"] == ["a.json"]


def test_the_shipped_recipe_loads_unchanged_by_an_unrelated_environment(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    path = REPO / "model" / "train" / "recipes" / "tiny-synth.yaml"
    before = load_config(path)
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE", "8")  # the recipe sets it
    assert load_config(path) == before


@pytest.mark.parametrize(
    ("where", "text", "override", "env", "message"),
    [
        ("recipe", "bogus: 1\n", [], {}, "unknown config key 'bogus'"),
        ("recipe", "train: {bach_size: 4}\n", [], {}, "unknown config key 'train.bach_size'"),
        ("override", "", ["train.bach_size=4"], {}, "unknown config key 'train.bach_size'"),
        ("override", "", ["augment.randaugment.x=1"], {}, "unknown config key 'augment.randaugment.x'"),
        (
            "env",
            "",
            [],
            {"ALBEF_TRAIN_TRAIN__BACH_SIZE": "4"},
            "unknown config key 'train.bach_size' (from the environment, ALBEF_TRAIN_TRAIN__BACH_SIZE)",
        ),
        (
            "env",
            "",
            [],
            {"ALBEF_TRAIN_TRIAN__BATCH_SIZE": "4"},
            "unknown config key 'trian.batch_size' (from the environment, ALBEF_TRAIN_TRIAN__BATCH_SIZE)",
        ),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(
    tmp_path: Path,
    clean_environment: pytest.MonkeyPatch,
    where: str,
    text: str,
    override: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for key, value in env.items():
        clean_environment.setenv(key, value)
    path = recipe(tmp_path, "data: {train: [a.json]}\n" + text) if text else None
    with pytest.raises(ConfigError) as info:
        load_config(path, [*DATA, *override])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batch_size=0", "'train.batch_size'"),
        ("train.batch_size=abc", "'train.batch_size'"),
        ("train.max_steps=0", "'train.max_steps'"),
        ("train.group_negatives=1.5", "'train.group_negatives'"),
        ("train.momentum=-0.1", "'train.momentum'"),
        ("train.alpha=2", "'train.alpha'"),
        ("checkpoint.every=0", "'checkpoint.every'"),
        ("log.every=0", "'log.every'"),
        ("final.dtype=int8", "'final.dtype'"),
        ("mode=finetune", "'mode'"),
        ("augment.crop_scale=[0.9, 0.5]", "'augment.crop_scale'"),
        ("augment.randaugment.ops=[Identity, Solarize]", "'augment.randaugment.ops'"),
        ("train=5", "'train' must be a mapping"),
        ("train.mlm=true", "train.mlm needs mode: pretrain"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(None, [*DATA, override])


def test_rules_across_groups() -> None:
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None)
    cfg = load_config(None, [*DATA, "mode=pretrain", "train.mlm=true"])
    assert cfg["train"]["mlm"] and cfg["mode"] == "pretrain"
    assert (
        load_config(None, [*DATA, "augment.randaugment="])["augment"]["randaugment"] is None
    )  # no RandAugment
    assert load_config(None, ["data.train=one.json"])["data"]["train"] == ["one.json"]


def test_a_bad_environment_value_names_its_variable(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE", "many")
    with pytest.raises(ConfigError, match=r"'train.batch_size'.*ALBEF_TRAIN_TRAIN__BATCH_SIZE"):
        load_config(None, DATA)
    assert load_config(None, [*DATA, "train.batch_size=2"])["train"]["batch_size"] == 2  # overridden: unused
    clean_environment.delenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE")
    clean_environment.setenv("ALBEF_TRAIN_AUGMENT__CROP_SCALE", "[0.5,")
    with pytest.raises(ConfigError, match=r"'augment'.*ALBEF_TRAIN_AUGMENT.*JSON"):
        load_config(None, DATA)


def test_data_synth_is_free_form(tmp_path: Path, clean_environment: pytest.MonkeyPatch) -> None:
    path = recipe(tmp_path, "data:\n  synth: {images: 30, seed: 1, anything: [1, 2]}\n")
    assert load_config(path)["data"]["synth"] == {"images": 30, "seed": 1, "anything": [1, 2]}
    cfg = load_config(path, ["data.synth.size=64", "data.synth.seed=2"])
    assert cfg["data"]["synth"] == {"images": 30, "seed": 2, "anything": [1, 2], "size": 64}
    assert load_config(None, ["data.synth={images: 5}"])["data"]["synth"] == {"images": 5}
    with pytest.raises(ConfigError, match="no training data"):
        load_config(path, ["data.synth=null"])
    clean_environment.setenv("ALBEF_TRAIN_DATA__SYNTH__IMAGES", "10")  # parsed as YAML, as overrides are
    clean_environment.setenv("ALBEF_TRAIN_DATA__SYNTH__ROOT", "/tmp/s")
    assert load_config(None)["data"]["synth"] == {"images": 10, "root": "/tmp/s"}
    assert load_config(path)["data"]["synth"] == {
        "images": 30,
        "seed": 1,
        "anything": [1, 2],
        "root": "/tmp/s",
    }


def test_validate_checks_a_dict_without_reading_the_environment(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("ALBEF_TRAIN_TRAIN__BATCH_SIZE", "many")
    cfg = load_config(None, [*DATA, "train.batch_size=2"])
    validate(cfg)
    with pytest.raises(ConfigError, match="unknown config key 'train.bach_size'"):
        validate({**cfg, "train": {**cfg["train"], "bach_size": 1}})
    with pytest.raises(ConfigError, match="no training data"):
        validate(DEFAULTS)
    with pytest.raises(ValidationError, match="train.batch_size"):
        TrainingConfig(data={"train": ["x.json"]})  # the settings class does read it


def test_the_module_stays_torch_free() -> None:
    code = "import sys, albef.model.train.settings; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
