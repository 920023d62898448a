"""Structured logging: one JSON object per line on stderr (``ALBEF_LOG_FORMAT=text`` for humans)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
# The keys every JSON line starts with; `extra` fields cannot replace them.
CORE_KEYS = frozenset({"ts", "level", "logger", "msg", "exc"})


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Fields passed with `extra={...}` become top-level keys, except the core ones: a caller (or a value
        # that came from a request) cannot rewrite ts/level/logger/msg/exc; such a field is kept as extra_KEY.
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[f"extra_{key}" if key in CORE_KEYS else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; later calls only change the level."""
    from albef.settings import LogSettings  # pydantic: imported when a command runs, not at `albef --help`

    env = LogSettings()
    level = level.upper() if level else env.level
    root = logging.getLogger()
    if not any(getattr(h, "_albef", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        if env.text_format:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        else:
            handler.setFormatter(JSONFormatter())
        handler._albef = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
