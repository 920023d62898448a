"""Progress bars: one rule for every long job (export, training, evaluation, synthesis, index builds).

A bar is drawn only on a terminal: ``disable=None`` lets tqdm switch itself off when stderr is not a TTY, so
log files and CI output get no ``\\r`` frames (the jobs log their progress as JSON lines instead).
``enabled=False`` (the callers' ``progress=False``) turns it off everywhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), shown only on a TTY."""
    from tqdm import tqdm

    kwargs.pop("disable", None)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
