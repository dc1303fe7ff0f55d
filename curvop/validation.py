"""Argument checks shared by the public API: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_num_matvecs", "check_positive_int", "check_real", "check_seed"]


def check_real(value: Any, name: str, *, positive: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number (``> 0`` when ``positive``).

    Raises
    ------
    ValueError
        For anything else, bools included, naming ``name``.
    """
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_real or not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite real number" if positive else "a finite real number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer ``>= 1`` (bools excluded), else raise ``ValueError``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> int | None:
    """``None`` or an integer seed (bools excluded), else raise ``TypeError``."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
    return int(seed)


def check_num_matvecs(num_matvecs: Any, minimum: int, name: str) -> int:
    """``num_matvecs`` checked to be an integer of at least ``minimum`` (the estimator ``name``'s
    smallest budget)."""
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    if num_matvecs < minimum:
        raise ValueError(f"num_matvecs must be at least {minimum} for {name}, got {num_matvecs}")
    return num_matvecs
