"""Run an ``albef`` command with a pause after every committed index shard.

The crash and resume tests must kill a build between shards, which a fast machine finishes too quickly to
catch. The pause is injected here, by wrapping the shard writer of ``albef.index.encode``, so that production code carries
no test hook. Usage: ``python tests/helpers/slow_shards.py SECONDS ALBEF_ARGS...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    from albef.cli import main as albef_main
    from albef.index import encode

    pause = float(sys.argv[1])
    save = encode.save_npz

    def save_then_pause(path: Path, arrays: Any) -> None:
        save(path, arrays)
        time.sleep(pause)

    encode.save_npz = save_then_pause  # encode looks it up at call time
    return albef_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
