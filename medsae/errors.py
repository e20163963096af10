"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class MedsaeError(Exception):
    """A user-facing error: the message is one line that says what and where."""

    exit_code = 1


class SpecError(MedsaeError):
    """An experiment spec is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class MissingInputError(MedsaeError):
    """A file, folder or set of weights the run needs is not there."""

    exit_code = 3
