"""Errors that reach the user as one line: which file, which field, and how to fix it."""

from __future__ import annotations


class HpoError(Exception):
    """An error the CLI prints as a single line (no traceback) and exits with status 2."""


class SpecError(HpoError):
    """A study or search-space file, or a value in it, is invalid.

    ``source`` names the file (or another origin such as ``"stored study definition"``),
    ``field`` the dotted path of the offending value, ``hint`` what to write instead.
    """

    def __init__(self, source: str, field: str, message: str, hint: str | None = None) -> None:
        self.source = source
        self.field = field
        self.message = message
        self.hint = hint
        text = f"{source}: {field}: {message}" if field else f"{source}: {message}"
        if hint:
            text += f" (fix: {hint})"
        super().__init__(text)


class StorageError(HpoError):
    """The storage URL cannot be used (bad scheme, unreachable server, missing driver)."""


class StudyDefinitionMismatch(HpoError):
    """A study exists with a stored definition that differs from the file that was given."""


# The exception types (their names, as a trainer reports them) of a mistake in a study's input, a
# study file or the data it names, rather than in the training code: their message names the file,
# the field and the fix, so a worker prints that line, not the traceback, and says to fix the input.
INPUT_ERROR_TYPES = frozenset({HpoError.__name__, SpecError.__name__})
