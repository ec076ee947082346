"""Argument checks shared by every layer, with the messages of :mod:`dynas.errors`.

Each check raises a one-line :class:`~dynas.errors.DynasError` (a :class:`ConfigError` unless
``error`` says otherwise) of the form ``name=value PROBLEM; allowed: WHAT`` and returns the
value it accepted.  ``name`` is what the user wrote (``"trials"``, ``"finetune steps"``,
``"stage_targets[2]"``); ``problem`` and ``allowed`` default to the usual wording and are given
where a caller has always said something more precise, so every message stays what it was::

    check_int("trials", trials, minimum=1)        # trials=0 is out of range; allowed: an integer >= 1
    check_positive("lr", lr)                      # lr=nan is out of range; allowed: a number > 0
    check_choice("sampler", name, sorted(SAMPLERS))  # sampler='x' is unknown; allowed: gp, nsga2, ...

A bool is never a number here, although Python counts it as an int.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from dynas.errors import ConfigError, DynasError

__all__ = ["check_int", "check_number", "check_positive", "check_choice"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(
    name: str,
    value: Any,
    minimum: int,
    maximum: int | None = None,
    *,
    numpy: bool = False,
    error: type[DynasError] = ConfigError,
) -> int:
    """``value``, an int in ``minimum .. maximum`` (no upper bound if ``maximum`` is None).

    Anything else is ``name=value is out of range; allowed: an integer >= minimum[ and <=
    maximum]``.  With ``numpy=True`` (the search's options, which seeds from NumPy reach) a NumPy
    integer counts as an int, and a value of another type gets its own message,
    ``name=value is not an integer; allowed: an integer >= minimum``.
    """
    types = (int, np.integer) if numpy else int
    if isinstance(value, bool) or not isinstance(value, types):
        if numpy:
            raise error(f"{name}={value!r} is not an integer; allowed: an integer >= {minimum}")
    elif value >= minimum and (maximum is None or value <= maximum):
        return value
    upper = f" and <= {maximum}" if maximum is not None else ""
    raise error(f"{name}={value!r} is out of range; allowed: an integer >= {minimum}{upper}")


def check_number(
    name: str,
    value: Any,
    minimum: float,
    maximum: float,
    *,
    allowed: str,
    problem: str = "is out of range",
    error: type[DynasError] = ConfigError,
) -> float:
    """``value``, a finite int or float in ``[minimum, maximum]``; else ``name=value PROBLEM; allowed: ALLOWED``."""
    if not (_is_number(value) and math.isfinite(value) and minimum <= value <= maximum):
        raise error(f"{name}={value!r} {problem}; allowed: {allowed}")
    return value


def check_positive(
    name: str,
    value: Any,
    *,
    allowed: str = "a number > 0",
    problem: str = "is out of range",
    error: type[DynasError] = ConfigError,
) -> float:
    """``value``, a finite int or float > 0; else ``name=value PROBLEM; allowed: ALLOWED``."""
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise error(f"{name}={value!r} {problem}; allowed: {allowed}")
    return value


def check_choice(
    name: str, value: Any, choices: Iterable[Any], *, problem: str = "is unknown", error: type[DynasError] = ConfigError
) -> Any:
    """The element of ``choices`` equal to ``value`` (a bool never equals a number here).

    Else ``name=value PROBLEM; allowed: c1, c2, ...``, the choices in the order given (pass
    ``sorted(...)`` for a registry).
    """
    choices = tuple(choices)
    for choice in choices:
        if choice == value and isinstance(choice, bool) == isinstance(value, bool):
            return choice
    raise error(f"{name}={value!r} {problem}; allowed: {', '.join(str(c) for c in choices)}")
