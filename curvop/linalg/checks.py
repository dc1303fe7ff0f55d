"""Argument checks of the linalg functions: each error names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..validation import check_positive_int

__all__ = ["as_float64_vector", "check_choice", "check_optional_positive_int"]


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
