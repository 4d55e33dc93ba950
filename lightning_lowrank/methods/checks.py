"""Argument checks shared by every config and schedule: one rule, one message style.

Each check returns the value in its canonical type (``4.0`` -> ``4`` for an integer) or raises a
``ValueError`` that names the argument and what to pass instead. A leaf module: it imports
nothing from the package.
"""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an ``int`` if it is a whole number (not a bool) ``>= minimum``, else a
    ``ValueError`` naming the argument and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    name: str, value: Any, nonzero: bool = False, minimum: float | None = None
) -> float:
    """``value`` as a finite ``float`` (optionally nonzero, or ``>= minimum``), else a
    ``ValueError`` naming the argument and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if nonzero and value == 0:
        raise ValueError(
            f"{name} must be nonzero: with {name}=0 the adapter's update is zero and it never "
            "trains (the usual choice is twice the rank)"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, closed: bool = False) -> float:
    """A probability in ``[0, 1)`` (``[0, 1]`` with ``closed``), else a ``ValueError``."""
    value = check_number(name, value)
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` (a string such as "false" is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
