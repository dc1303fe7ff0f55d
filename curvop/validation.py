"""Argument checks of the public API: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_float64_vector",
    "check_choice",
    "check_memory_gb",
    "check_num_matvecs",
    "check_optional_positive_int",
    "check_positive_int",
    "check_real",
    "check_seed",
]


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


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_optional_positive_int(value: Any, name: str) -> int | None:
    """``None``, or ``value`` checked to be an integer ``>= 1``."""
    return None if value is None else check_positive_int(value, name)


def as_float64_vector(vector: Any, name: str, n: int) -> np.ndarray:
    """A numpy or torch vector of shape ``(n,)`` as a finite real float64 numpy array.

    Raises
    ------
    TypeError
        If ``vector`` is neither a numpy array nor a torch tensor, or is complex or not numeric.
    ValueError
        If its shape is not ``(n,)`` or it contains NaN or Inf.
    """
    if isinstance(vector, torch.Tensor):
        if vector.is_complex():
            raise TypeError(f"{name} must be real, got complex dtype {vector.dtype}")
        array = vector.detach().to("cpu", torch.float64).numpy()
    elif isinstance(vector, np.ndarray):
        if not (
            np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)
        ):
            raise TypeError(f"{name} must have a real numeric dtype, got {vector.dtype}")
        array = vector.astype(np.float64)
    else:
        raise TypeError(
            f"{name} must be a numpy array or a torch tensor, got {type(vector).__name__}"
        )
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got a vector that contains NaN or Inf")
    return array


def check_memory_gb(memory_gb: Any) -> int | None:
    """``None`` (the device's default budget) or a positive number of GiB, as bytes."""
    if memory_gb is None:
        return None
    return int(check_real(memory_gb, "memory_gb", positive=True) * 2**30)
