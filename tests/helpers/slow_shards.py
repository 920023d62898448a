"""Run an ``albef`` command with a pause after every committed index shard.

The crash and resume tests must kill a build between shards, which a fast machine finishes too quickly to
catch. The pause is injected here, by wrapping the builder's shard writer, so that production code carries
no test hook. Usage: ``python tests/helpers/slow_shards.py SECONDS ALBEF_ARGS...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    from albef.cli import main as albef_main
    from albef.index import builder

    pause = float(sys.argv[1])
    save = builder._save_npz

    def save_then_pause(path: Path, arrays: Any) -> None:
        save(path, arrays)
        time.sleep(pause)

    builder._save_npz = save_then_pause
    return albef_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
