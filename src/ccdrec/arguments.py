"""Checks of argument values shared by every layer of the package: a number that must be an int of at
least some size, or a fraction in a range. A wrong value is an :class:`InvalidArgument` (a ``ValueError``),
a wrong type a :class:`WrongArgumentType` (a ``TypeError``), each one line naming the argument.
:mod:`ccdrec.models.checks` adds the checks of models, matrices and blocks, and re-exports these."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np

from ccdrec.errors import InvalidArgument, WrongArgumentType


def shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def described(value: Any) -> str:
    """``None``, or the type and the (shortened) repr of ``value``: ``float 2.5``."""
    return "None" if value is None else f"{type(value).__name__} {shown(value)}"


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int; raises unless it is an integer (not a bool) of at least ``minimum``."""
    if not is_int(value):
        raise WrongArgumentType(f"{name} must be an int of at least {minimum}, not {described(value)}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}, not {int(value)}")
    return int(value)


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0, *, closed: bool = False) -> float:
    """``value`` as a float in ``[low, high)`` (``closed``: ``[low, high]``); raises otherwise (bools and
    non-numbers are type errors)."""
    span = f"[{low:g}, {high:g}{']' if closed else ')'}"
    if not isinstance(value, Real) or isinstance(value, (bool, np.bool_)):
        raise WrongArgumentType(f"{name} must be a number in {span}, not {described(value)}")
    if not (low <= float(value) <= high if closed else low <= float(value) < high):
        raise InvalidArgument(f"{name} must be in {span}, not {value}")
    return float(value)
