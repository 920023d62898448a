"""albef.index: FAISS indexes over ALBEF ITC embeddings, SQLite metadata and ITM re-rank features.

Writers live in :mod:`albef.index.builder` (build/add/delete), readers in :mod:`albef.index.reader`
(``IndexReader``, ``current_version``). This package never imports torch. Nothing is imported eagerly here
so that ``albef --help`` stays fast; ``from albef.index import IndexReader`` works lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IndexReader", "current_version"]


def __getattr__(name: str) -> Any:
    if name in ("IndexReader", "current_version"):
        from albef.index import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'albef.index' has no attribute {name!r}")
