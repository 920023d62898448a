"""Training configuration: pydantic models with defaults, the environment, YAML recipes and overrides.

:class:`TrainingConfig` is the schema: one group per section of a recipe (``model``, ``data``, ``augment``,
``train``, ``optim``, ``checkpoint``, ``log``, ``eval``, ``final``, ``debug``), each field with its default,
a description and its bounds. :func:`load_config` builds it with this precedence, lowest first:

1. the defaults declared in :mod:`albef.model.train.schema` (:data:`DEFAULTS` is them as a plain dict);
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
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from albef.model.train.schema import (  # noqa: F401  (re-exported: the schema's public names)
    ALL_OPS,
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    FREE_FORM,
    ConfigError,
    TrainingSchema,
)


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
