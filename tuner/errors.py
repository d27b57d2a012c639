"""The few errors `tuner` raises on purpose. Each message says what is wrong and how to fix it.

The CLI turns every `TunerError` into one line on stderr and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""

    exit_code = 2


class SpecError(TunerError):
    """A study file (or an option overriding it) is malformed or out of range."""


class DataError(TunerError):
    """A data file is missing, damaged or of the wrong shape."""


class StorageError(TunerError):
    """The storage URL is wrongly written, or the database cannot be reached."""

    exit_code = 3


class StudyNotFound(TunerError):
    """A command named a study the database does not hold."""
