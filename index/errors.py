"""Exceptions of the index package. All derive from :class:`IndexError_` so callers can catch one type."""

from __future__ import annotations


class IndexError_(Exception):  # noqa: N801 - the builtin IndexError means something else
    """Base class for index errors (bad index folder, bad input, refused operation)."""


class IndexNotFoundError(IndexError_, FileNotFoundError):
    """The folder holds no index, or the requested version does not exist."""


class IndexMismatchError(IndexError_):
    """The index was built with another model bundle than the one it is opened or extended with."""


class IndexFormatError(IndexError_):
    """A file of the index is missing or does not have the expected layout."""


class SourceError(IndexError_):
    """A build source cannot be read (unknown format, malformed JSON/CSV, missing column)."""


class IndexLockedError(IndexError_):
    """Another process is writing to the index."""


class ResumeError(IndexError_):
    """An interrupted build is in the way, or ``--resume`` does not match the interrupted one."""
