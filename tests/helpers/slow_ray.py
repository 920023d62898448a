"""Run an ``albef index build|add --ray ADDRESS`` whose Ray workers pause before every image encoder call.

The fault tests kill an encoder actor mid-build, which a build of a few hundred tiny images finishes too quickly
to catch. The pause is injected here, into the worker processes of this driver's Ray job only (Ray's
``worker_process_setup_hook``, run by each worker as it starts), so that production code carries no test hook.
Usage: ``python tests/helpers/slow_ray.py SECONDS ALBEF_ARGS...`` (the args must hold ``--ray ADDRESS``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any


def pause_image_encoder(seconds: float) -> Callable[[], None]:
    """The setup hook: in each Ray worker process of the job, ``Bundle.encode_pixels`` sleeps first."""

    def setup() -> None:
        from albef.model.runtime import Bundle

        encode = Bundle.encode_pixels

        def slow(self: Any, pixels: Any) -> Any:
            time.sleep(seconds)
            return encode(self, pixels)

        Bundle.encode_pixels = slow  # type: ignore[method-assign]

    return setup


def main() -> int:
    import ray

    from albef.cli import main as albef_main

    pause, args = float(sys.argv[1]), sys.argv[2:]
    address = args[args.index("--ray") + 1]
    # Connected here, the albef command finds the connection and uses it (RayEncoder connects only if needed).
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": pause_image_encoder(pause)},
    )
    try:
        return albef_main(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
