"""Errors that dynas reports to users.

Every user-facing problem is a :class:`DynasError` whose message is one line naming the
field, the value and what is allowed.  The CLI prints it and exits with status 2; the Python
API lets it propagate (it is a ``ValueError``, so ``except ValueError`` catches it too).
"""

from __future__ import annotations

__all__ = ["DynasError", "ConfigError", "TargetError", "StudyError"]


class DynasError(ValueError):
    """Base class of every error dynas raises for bad input."""


class ConfigError(DynasError):
    """An architecture config (or a search-space option) is invalid."""


class TargetError(DynasError):
    """A hardware target name or file is invalid."""


class StudyError(DynasError):
    """A storage URL, study or trial cannot be used."""
