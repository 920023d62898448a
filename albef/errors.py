"""Errors shared by the command line and the libraries."""

from __future__ import annotations


class CLIError(Exception):
    """A runtime failure the user can act on (a missing file, a busy port, a failed export): the CLI prints
    it as one line on stderr, naming the subcommand, and exits with status 1."""

    exit_code = 1


class UsageError(CLIError):
    """The command line itself is wrong (a bad value, options that exclude each other): exit status 2, as
    argparse uses for the usage errors it finds itself."""

    exit_code = 2
