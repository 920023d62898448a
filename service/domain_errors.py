"""What a search can fail with, independent of HTTP: the engine, the batcher and the upload decoder raise
these; :mod:`albef.service.errors` maps each class to its status code (the only place that knows them).

Every error has a stable ``code``, a ``message`` safe to show to clients and, where one input is to blame,
the ``field`` that names it.
"""

from __future__ import annotations

__all__ = [
    "SearchError",
    "BadQuery",
    "WrongItemKind",
    "NotFound",
    "TooLarge",
    "UnsupportedFormat",
    "Overloaded",
]


class SearchError(Exception):
    def __init__(self, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class BadQuery(SearchError):
    """The query cannot be answered as sent (no words in the text, an unreadable image)."""


class WrongItemKind(BadQuery):
    """The query item is of the other kind (an image where a text is needed, or the reverse). The message
    names no route: the caller knows which one takes the other kind."""

    def __init__(self, item_id: int, kind: str, wanted: str) -> None:
        super().__init__(
            "wrong_item_kind",
            f"item {item_id} is an {kind}; the search needs an indexed {wanted}",
            field="item_id",
        )
        self.item_id = item_id
        self.kind = kind
        self.wanted = wanted


class NotFound(SearchError):
    """An item the query names is not in the served index version."""


class TooLarge(SearchError):
    """An upload exceeds a size limit (bytes or pixels)."""


class UnsupportedFormat(SearchError):
    """An upload in a format outside the allow-list."""


class Overloaded(SearchError):
    """A stage's queue is full: the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, stage: str, retry_after_s: int = 1) -> None:
        super().__init__("overloaded", f"the {stage} queue is full; retry later")
        self.stage = stage
        self.retry_after_s = int(retry_after_s)
