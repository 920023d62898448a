"""What every benchmark JSON carries, written one way: the CPU (model, flags), the load, the command.

A figure is only meaningful next to the machine it ran on: the CPU changes between sessions (AVX2-only EPYC,
AVX-512/VNNI/AMX Xeon), and a busy machine runs slower. ``write_result`` adds those fields and publishes the
file atomically (a temp name, then a rename), so a killed benchmark never leaves half a JSON behind.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from albef import atomic
from albef.cpu import cpu_info


def machine() -> dict[str, Any]:
    """The CPU and platform, plus the load averages now (1, 5, 15 min)."""
    return {
        **cpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON with ``cpu`` (model, flags, platform, load averages at the end of the run) and
    ``command`` filled in."""
    out = {**result, "cpu": machine()}
    out.setdefault("command", " ".join(["python", *sys.argv]))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, out)
