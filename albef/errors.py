"""Errors shared by the command line and the libraries."""

from __future__ import annotations


class CLIError(Exception):
    """A user error: the CLI prints it as one line on stderr and exits with status 2."""
