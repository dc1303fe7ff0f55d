"""The warning of every iterative method that stops before it reaches its tolerance."""

from __future__ import annotations

__all__ = ["ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before reaching the requested tolerance; what it returns is
    less accurate than asked, by as much as the warning says."""
